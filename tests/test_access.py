"""Who may do what: no token, a bad token or another clinician's token gets nothing and changes nothing."""

import uuid

import pytest

from clinical.api import NOT_FOUND
from clinical.models import AuditEvent, ChangeSequence, IdempotencyKey, Token
from clinical.tokens import UNAUTHORIZED
from recordings.models import Recording

pytestmark = pytest.mark.django_db(transaction=True)

# Every endpoint that needs a token, and how to call it on recording `rid`.
ENDPOINTS = {
    "list": ("GET", "/recordings", None),
    "create": ("POST", "/recordings", {"patient_ref": "PAT-NEW"}),
    "get": ("GET", "/recordings/{rid}", None),
    "patch": ("PATCH", "/recordings/{rid}", {"version": 1, "title": "changed", "status": "uploaded"}),
    "delete": ("DELETE", "/recordings/{rid}", None),
    "sync": ("GET", "/sync/changes?since=0", None),
    "revoke": ("DELETE", "/auth/token", None),
}
TOKEN_STATE = [field.attname for field in Token._meta.concrete_fields if field.name != "last_used_at"]
BAD_AUTHORIZATION = {
    "no-token": {},
    "unknown-token": {"Authorization": "Bearer " + "x" * 43},
    "not-bearer": {"Authorization": "Token abc"},
}


async def snapshot() -> dict:
    """Everything a request could change."""
    return {
        "recordings": [row async for row in Recording.objects.order_by("pk").values()],
        # last_used_at aside: presenting a valid token is a use of it, whatever the answer.
        "tokens": [row async for row in Token.objects.order_by("pk").values(*TOKEN_STATE)],
        "sequence": [row async for row in ChangeSequence.objects.values()],
        "events": [row async for row in AuditEvent.objects.order_by("pk").values()],
        "idempotency": [row async for row in IdempotencyKey.objects.order_by("pk").values()],
    }


async def call(api, endpoint: str, recording_id, **kwargs):
    method, path, body = ENDPOINTS[endpoint]
    return await api.request(method, path.format(rid=recording_id), body, **kwargs)


@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION)
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_without_a_valid_token_every_endpoint_is_a_401(api, alice, make_recording, endpoint, authorization):
    recording = await make_recording(owner=alice)
    await api.token_for(alice)  # a live token exists, and is not the one presented
    before = await snapshot()

    response = await call(api, endpoint, recording.id, headers=BAD_AUTHORIZATION[authorization])

    assert response.status_code == 401
    assert response.json() == {"detail": UNAUTHORIZED}
    assert response.headers["www-authenticate"] == "Bearer"
    assert await snapshot() == before


@pytest.mark.parametrize("endpoint", ["get", "patch", "delete"])
async def test_another_clinicians_recording_is_a_404_and_stays_untouched(api, alice, bob, make_recording, endpoint):
    recording = await make_recording(owner=alice, transcript="alice's patient")
    await api.token_for(bob)
    before = await snapshot()

    response = await call(api, endpoint, recording.id, user=bob)

    assert response.status_code == 404
    assert response.json() == {"detail": NOT_FOUND}
    assert "alice's patient" not in response.text
    assert await snapshot() == before
    assert not await AuditEvent.objects.filter(recording_id=recording.id, user_id=bob.pk).aexists()


@pytest.mark.parametrize("endpoint", ["get", "patch", "delete"])
async def test_another_clinicians_recording_answers_like_one_that_never_existed(
    api, alice, bob, make_recording, endpoint
):
    recording = await make_recording(owner=alice)

    theirs = await call(api, endpoint, recording.id, user=bob)
    nowhere = await call(api, endpoint, uuid.uuid4(), user=bob)

    assert (theirs.status_code, theirs.json()) == (nowhere.status_code, nowhere.json())


async def test_another_clinicians_deleted_recording_is_a_404_too(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)
    await api.token_for(bob)
    before = await snapshot()

    answers = [await call(api, endpoint, recording.id, user=bob) for endpoint in ("get", "patch", "delete")]

    assert [response.status_code for response in answers] == [404, 404, 404]
    assert await snapshot() == before


async def test_an_idempotent_patch_of_another_clinicians_recording_is_a_404_and_stores_nothing(
    api, alice, bob, make_recording
):
    recording = await make_recording(owner=alice)
    await api.token_for(bob)
    before = await snapshot()

    response = await call(api, "patch", recording.id, user=bob, headers={"Idempotency-Key": "k-1"})

    assert response.status_code == 404
    assert await snapshot() == before


@pytest.mark.parametrize("endpoint", ["list", "sync"])
async def test_lists_and_the_feed_show_only_ones_own_recordings(api, alice, bob, make_recording, endpoint):
    mine = await make_recording(owner=bob, patient_ref="PAT-BOB")
    theirs = await make_recording(owner=alice, patient_ref="PAT-ALICE")

    response = await call(api, endpoint, None, user=bob)

    body = response.json()
    rows = body["items"] if endpoint == "list" else body["changes"]
    assert [row["id"] for row in rows] == [str(mine.id)]
    assert "PAT-ALICE" not in response.text
    assert not await AuditEvent.objects.filter(recording_id=theirs.id, user_id=bob.pk).aexists()


async def test_creating_with_another_clinicians_id_changes_nothing(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice, title="alice's title")
    await api.token_for(bob)
    before = await snapshot()

    response = await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-BOB"}, user=bob)

    assert response.status_code == 409
    assert "alice's title" not in response.text
    assert await snapshot() == before


async def test_revoking_revokes_only_the_token_presented(api, alice, bob):
    alices = await api.token_for(alice)
    bobs = await api.token_for(bob)

    response = await api.delete("/auth/token", token=bobs)

    assert response.status_code == 204
    assert (await api.get("/recordings", token=alices)).status_code == 200
    assert (await api.get("/recordings", token=bobs)).status_code == 401
