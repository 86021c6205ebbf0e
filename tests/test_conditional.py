"""Conditional requests (RFC 9110): ETag on every answer that carries one recording, If-None-Match, If-Match."""

import asyncio
import uuid

import pytest
from django.test import RequestFactory

from clinical.conditional import entity_tags, if_match_passes, if_none_match_passes
from clinical.idempotency import KEY_REUSED, fingerprint
from clinical.models import AuditEvent
from recordings.models import Recording
from recordings.schemas import NOT_NULL, VERSION_OR_IF_MATCH
from recordings.services import PRECONDITION_FAILED, STALE_VERSION

DIGEST = "a" * 64
OTHER = "b" * 64


def etag_of(response) -> str:
    return f'"{response.json()["digest"]}"'


async def stored(recording_id) -> Recording:
    return await Recording.objects.aget(pk=recording_id)


async def row(recording_id) -> dict:
    return await Recording.objects.filter(pk=recording_id).values().aget()


async def events(recording_id, action: str) -> int:
    return await AuditEvent.objects.filter(recording_id=recording_id, action=action).acount()


# Entity tags and their comparison (clinical.conditional)


@pytest.mark.parametrize(
    ("value", "tags"),
    [
        ('"abc"', [(False, "abc")]),
        ('W/"abc"', [(True, "abc")]),
        ('""', [(False, "")]),
        ('"a", W/"b" ,"c"', [(False, "a"), (True, "b"), (False, "c")]),
        ('"a,b", "c"', [(False, "a,b"), (False, "c")]),
        (' ,"a",, "b", ', [(False, "a"), (False, "b")]),
        ("", []),
    ],
    ids=["strong", "weak", "empty-tag", "list", "comma-inside", "empty-elements", "empty"],
)
def test_lists_of_entity_tags_are_read_as_rfc_9110_writes_them(value, tags):
    assert entity_tags(value) == tags


@pytest.mark.parametrize("value", ["abc", 'w/"abc"', '"abc', '"a" "b"', '"a"b', 'W/ "a"', '"a b"', '*, "a"'])
def test_what_is_not_a_list_of_entity_tags_reads_as_none(value):
    assert entity_tags(value) is None


@pytest.mark.parametrize(
    ("value", "passes"),
    [
        (None, True),
        (f'"{DIGEST}"', True),
        ("*", True),
        (f'"{OTHER}", "{DIGEST}"', True),
        (f'W/"{DIGEST}"', False),
        (f'"{OTHER}"', False),
        (DIGEST, False),
        ("", False),
    ],
    ids=["absent", "same", "any", "in-a-list", "weak", "other", "unquoted", "empty"],
)
def test_if_match_compares_strongly(value, passes):
    assert if_match_passes(value, DIGEST) is passes


@pytest.mark.parametrize(
    ("value", "passes"),
    [
        (None, True),
        (f'"{DIGEST}"', False),
        (f'W/"{DIGEST}"', False),
        ("*", False),
        (f'"{OTHER}", W/"{DIGEST}"', False),
        (f'"{OTHER}"', True),
        (DIGEST, True),
    ],
    ids=["absent", "same", "weak", "any", "in-a-list", "other", "unquoted"],
)
def test_if_none_match_compares_weakly(value, passes):
    assert if_none_match_passes(value, DIGEST) is passes


# ETag on every answer that carries one recording


@pytest.mark.django_db(transaction=True)
async def test_every_answer_that_carries_one_recording_has_its_etag(api, alice):
    chosen = str(uuid.uuid4())
    path = f"/recordings/{chosen}"

    answers = {
        "create": await api.post("/recordings", {"id": chosen, "patient_ref": "PAT-1"}, user=alice),
        "retried create": await api.post("/recordings", {"id": chosen, "patient_ref": "PAT-1"}, user=alice),
        "get": await api.get(path, user=alice),
        "patch": await api.patch(path, {"version": 1, "title": "New"}, user=alice),
        "patch changing nothing": await api.patch(path, {"version": 2, "title": "New"}, user=alice),
        "stale version": await api.patch(path, {"version": 1, "title": "x"}, user=alice),
        "refused transition": await api.patch(path, {"version": 2, "status": "verified"}, user=alice),
        "stale If-Match": await api.patch(path, {"title": "x"}, user=alice, headers={"If-Match": f'"{"0" * 64}"'}),
    }

    assert {name: answer.status_code for name, answer in answers.items()} == {
        "create": 201,
        "retried create": 200,
        "get": 200,
        "patch": 200,
        "patch changing nothing": 200,
        "stale version": 409,
        "refused transition": 409,
        "stale If-Match": 412,
    }
    assert {name: answer.headers.get("ETag") for name, answer in answers.items()} == {
        name: etag_of(answer) for name, answer in answers.items()
    }
    assert answers["patch"].headers["ETag"] == f'"{(await stored(chosen)).digest}"'
    assert answers["create"].headers["ETag"] != answers["patch"].headers["ETag"]


@pytest.mark.django_db(transaction=True)
async def test_answers_without_a_recording_have_no_etag(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)

    answers = [
        await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-1"}, user=bob),  # 409, not hers
        await api.get(f"/recordings/{recording.id}", user=bob),
        await api.get("/recordings", user=alice),
        await api.delete(f"/recordings/{recording.id}", user=alice),
    ]

    assert [answer.status_code for answer in answers] == [409, 404, 200, 204]
    assert [answer.headers.get("ETag") for answer in answers] == [None] * len(answers)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("budget", ["kept", "past the budget"])
async def test_idempotent_replays_carry_the_etag_of_what_they_replay(api, alice, make_recording, settings, budget):
    if budget == "past the budget":
        settings.CLINICAL_IDEMPOTENCY_MAX_BYTES_PER_USER = 0  # replayed from the recording itself
    recording = await make_recording(owner=alice)
    create = {"patient_ref": "PAT-1"}
    patch = {"version": 1, "title": "New"}

    created = await api.post("/recordings", create, user=alice, headers={"Idempotency-Key": "c"})
    created_again = await api.post("/recordings", create, user=alice, headers={"Idempotency-Key": "c"})
    patched = await api.patch(f"/recordings/{recording.id}", patch, user=alice, headers={"Idempotency-Key": "p"})
    patched_again = await api.patch(f"/recordings/{recording.id}", patch, user=alice, headers={"Idempotency-Key": "p"})

    assert [created_again.headers["Idempotent-Replayed"], patched_again.headers["Idempotent-Replayed"]] == ["true"] * 2
    assert created_again.headers["ETag"] == created.headers["ETag"] == etag_of(created_again)
    assert patched_again.headers["ETag"] == patched.headers["ETag"] == etag_of(patched_again)


# If-None-Match on GET


@pytest.mark.django_db(transaction=True)
async def test_a_current_if_none_match_answers_304_with_the_etag_and_no_body(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    etag = f'"{recording.digest}"'

    response = await api.get(f"/recordings/{recording.id}", user=alice, headers={"If-None-Match": etag})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["ETag"] == etag
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.django_db(transaction=True)
async def test_a_304_is_audited_as_a_read(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    reads = await events(recording.id, "read")

    response = await api.get(
        f"/recordings/{recording.id}", user=alice, headers={"If-None-Match": f'"{recording.digest}"'}
    )

    assert response.status_code == 304
    assert await events(recording.id, "read") == reads + 1
    event = await AuditEvent.objects.filter(recording_id=recording.id, action="read").afirst()
    assert (event.user_id, event.outcome) == (alice.pk, "success")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("header", "status"),
    [
        ('"{digest}"', 304),
        ('W/"{digest}"', 304),
        ('"{other}", "{digest}"', 304),
        ("*", 304),
        ('"{other}"', 200),
        ('W/"{other}"', 200),
        ("{digest}", 200),
        ("", 200),
    ],
    ids=["strong", "weak", "in-a-list", "any", "other", "other-weak", "unquoted", "empty"],
)
async def test_if_none_match_forms(api, alice, make_recording, header, status):
    recording = await make_recording(owner=alice)
    value = header.format(digest=recording.digest, other="0" * 64)

    response = await api.get(f"/recordings/{recording.id}", user=alice, headers={"If-None-Match": value})

    assert response.status_code == status
    assert response.headers["ETag"] == f'"{recording.digest}"'
    if status == 200:
        assert response.json()["digest"] == recording.digest


@pytest.mark.django_db(transaction=True)
async def test_an_etag_from_before_a_change_gets_the_new_recording(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    old = f'"{recording.digest}"'
    await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "New"}, user=alice)

    response = await api.get(f"/recordings/{recording.id}", user=alice, headers={"If-None-Match": old})

    assert response.status_code == 200
    assert response.json()["title"] == "New"
    assert response.headers["ETag"] == etag_of(response) != old


@pytest.mark.django_db(transaction=True)
async def test_if_none_match_on_someone_elses_recording_is_a_404(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.get(f"/recordings/{recording.id}", user=bob, headers={"If-None-Match": "*"})

    assert response.status_code == 404


# If-Match on PATCH


@pytest.mark.django_db(transaction=True)
async def test_a_patch_may_carry_if_match_instead_of_a_version(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.patch(
        f"/recordings/{recording.id}", {"title": "New"}, user=alice, headers={"If-Match": f'"{recording.digest}"'}
    )

    assert response.status_code == 200
    assert response.json()["version"] == 2
    assert response.json()["title"] == "New"
    assert response.headers["ETag"] == f'"{(await stored(recording.id)).digest}"'


@pytest.mark.django_db(transaction=True)
async def test_a_stale_if_match_is_a_412_with_the_current_recording_and_changes_nothing(api, alice, make_recording):
    recording = await make_recording(owner=alice, title="Old")
    stale = f'"{recording.digest}"'
    current = (await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Newer"}, user=alice)).json()
    before, updates = await row(recording.id), await events(recording.id, "update")

    response = await api.patch(
        f"/recordings/{recording.id}", {"title": "Lost"}, user=alice, headers={"If-Match": stale}
    )

    body = response.json()
    assert response.status_code == 412
    assert body["detail"] == PRECONDITION_FAILED
    assert body["current"] == current
    assert {key: body[key] for key in current} == current
    assert response.headers["ETag"] == f'"{current["digest"]}"'
    assert await row(recording.id) == before
    assert (await stored(recording.id)).version == 2
    assert await events(recording.id, "update") == updates


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("header", "status"),
    [
        ("*", 200),
        ('"{other}", "{digest}"', 200),
        ('W/"{digest}"', 412),
        ("{digest}", 412),
        ('"{other}"', 412),
    ],
    ids=["any", "in-a-list", "weak", "unquoted", "other"],
)
async def test_if_match_forms_on_patch(api, alice, make_recording, header, status):
    recording = await make_recording(owner=alice)
    value = header.format(digest=recording.digest, other="0" * 64)

    response = await api.patch(f"/recordings/{recording.id}", {"title": "x"}, user=alice, headers={"If-Match": value})

    assert response.status_code == status
    assert (await stored(recording.id)).version == (2 if status == 200 else 1)


@pytest.mark.django_db(transaction=True)
async def test_with_both_a_stale_if_match_is_a_412_and_a_stale_version_a_409(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    stale_tag = f'"{recording.digest}"'
    current = (await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Newer"}, user=alice)).json()
    path = f"/recordings/{recording.id}"

    stale_if_match = await api.patch(path, {"version": 2, "title": "x"}, user=alice, headers={"If-Match": stale_tag})
    both_stale = await api.patch(path, {"version": 1, "title": "x"}, user=alice, headers={"If-Match": stale_tag})
    stale_version = await api.patch(
        path, {"version": 1, "title": "x"}, user=alice, headers={"If-Match": f'"{current["digest"]}"'}
    )
    both_current = await api.patch(
        path, {"version": 2, "title": "x"}, user=alice, headers={"If-Match": f'"{current["digest"]}"'}
    )

    assert [stale_if_match.status_code, both_stale.status_code, stale_version.status_code] == [412, 412, 409]
    assert [stale_if_match.json()["detail"], stale_version.json()["detail"]] == [PRECONDITION_FAILED, STALE_VERSION]
    assert both_current.status_code == 200
    assert (await stored(recording.id)).version == 3


@pytest.mark.django_db(transaction=True)
async def test_a_patch_with_neither_version_nor_if_match_is_a_422(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    neither = await api.patch(f"/recordings/{recording.id}", {"title": "x"}, user=alice)
    null_version = await api.patch(f"/recordings/{recording.id}", {"version": None, "title": "x"}, user=alice)

    assert [neither.status_code, null_version.status_code] == [422, 422]
    assert [error["msg"] for error in neither.json()["detail"]] == [VERSION_OR_IF_MATCH]
    assert NOT_NULL in " ".join(error["msg"] for error in null_version.json()["detail"])
    assert await row(recording.id) == before


@pytest.mark.django_db(transaction=True)
async def test_if_match_on_someone_elses_recording_is_a_404(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    header = {"If-Match": f'"{recording.digest}"'}

    patched = await api.patch(f"/recordings/{recording.id}", {"title": "x"}, user=bob, headers=header)
    deleted = await api.delete(f"/recordings/{recording.id}", user=bob, headers=header)

    assert [patched.status_code, deleted.status_code] == [404, 404]
    assert (await stored(recording.id)).version == 1


@pytest.mark.django_db(transaction=True)
async def test_two_patches_with_the_same_if_match_cannot_both_win(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    path, header = f"/recordings/{recording.id}", {"If-Match": f'"{recording.digest}"'}
    await api.token_for(alice)

    first, second = await asyncio.gather(
        api.patch(path, {"title": "first"}, user=alice, headers=header),
        api.patch(path, {"title": "second"}, user=alice, headers=header),
    )

    winner = first if first.status_code == 200 else second
    loser = second if winner is first else first
    assert sorted([first.status_code, second.status_code]) == [200, 412]
    assert loser.json()["current"] == winner.json()
    assert (await stored(recording.id)).title == winner.json()["title"]
    assert (await stored(recording.id)).version == 2


# If-Match on DELETE


@pytest.mark.django_db(transaction=True)
async def test_a_delete_with_a_stale_if_match_is_a_412_and_the_recording_stays(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    stale = f'"{recording.digest}"'
    current = (await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Newer"}, user=alice)).json()

    response = await api.delete(f"/recordings/{recording.id}", user=alice, headers={"If-Match": stale})

    assert response.status_code == 412
    assert response.json()["detail"] == PRECONDITION_FAILED
    assert response.json()["current"] == current
    assert response.headers["ETag"] == f'"{current["digest"]}"'
    assert (await stored(recording.id)).deleted_at is None
    assert await events(recording.id, "delete") == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("header", ['"{digest}"', "*"], ids=["current", "any"])
async def test_a_delete_with_a_matching_if_match_deletes(api, alice, make_recording, header):
    recording = await make_recording(owner=alice)

    response = await api.delete(
        f"/recordings/{recording.id}", user=alice, headers={"If-Match": header.format(digest=recording.digest)}
    )

    assert response.status_code == 204
    assert (await stored(recording.id)).deleted_at is not None


@pytest.mark.django_db(transaction=True)
async def test_deleting_a_deleted_recording_is_a_204_whatever_if_match_says(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    live_tag = f'"{recording.digest}"'
    await api.delete(f"/recordings/{recording.id}", user=alice)
    before = await row(recording.id)

    answers = [
        await api.delete(f"/recordings/{recording.id}", user=alice, headers={"If-Match": value})
        for value in (live_tag, '"stale"', "*")
    ]

    assert [answer.status_code for answer in answers] == [204, 204, 204]
    assert await row(recording.id) == before


@pytest.mark.django_db(transaction=True)
async def test_deleting_with_if_match_a_recording_never_seen_is_a_404(api, alice):
    response = await api.delete(f"/recordings/{uuid.uuid4()}", user=alice, headers={"If-Match": "*"})

    assert response.status_code == 404


# Idempotency-Key: If-Match is part of the request


def test_a_fingerprint_without_if_match_is_what_it_was_before_if_match_counted():
    factory = RequestFactory()
    path = "/api/recordings/5f0c8a52-7b7e-4a43-9d0e-8a3f4f1b2c3d"

    patch = factory.patch(path, data=b'{"version": 1, "title": "x"}', content_type="application/json")
    delete = factory.delete(path)

    # As computed before If-Match counted: keys stored then still replay.
    assert fingerprint(patch) == "fe48c558d6a3c72f0ffa7a4947563011c57b49d3919ee009020673b82ad86bad"
    assert fingerprint(delete) == "32a17305df192191e71030920a706d5a9519fe11ff9948899b3ca6bc977dfc04"


def test_if_match_changes_the_fingerprint():
    factory = RequestFactory()
    path = "/api/recordings/5f0c8a52-7b7e-4a43-9d0e-8a3f4f1b2c3d"
    body = b'{"title": "x"}'

    prints = [
        fingerprint(factory.patch(path, data=body, content_type="application/json", headers=headers))
        for headers in ({}, {"If-Match": '"a"'}, {"If-Match": '"b"'}, {"If-Match": '"a"'})
    ]

    assert len(set(prints[:3])) == 3
    assert prints[3] == prints[1]


@pytest.mark.django_db(transaction=True)
async def test_the_same_key_with_another_if_match_is_another_request(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    path, tag = f"/recordings/{recording.id}", f'"{recording.digest}"'
    first = await api.patch(path, {"title": "New"}, user=alice, headers={"Idempotency-Key": "k", "If-Match": tag})

    again = await api.patch(path, {"title": "New"}, user=alice, headers={"Idempotency-Key": "k", "If-Match": tag})
    other = await api.patch(path, {"title": "New"}, user=alice, headers={"Idempotency-Key": "k", "If-Match": "*"})
    deleted = await api.delete(path, user=alice, headers={"Idempotency-Key": "d", "If-Match": first.headers["ETag"]})
    deleted_other = await api.delete(path, user=alice, headers={"Idempotency-Key": "d"})

    assert first.status_code == 200
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (200, "true")
    assert (other.status_code, other.json()["detail"]) == (422, KEY_REUSED)
    assert deleted.status_code == 204
    assert (deleted_other.status_code, deleted_other.json()["detail"]) == (422, KEY_REUSED)
    assert (await stored(recording.id)).version == 3


# The OpenAPI document


@pytest.mark.django_db(transaction=True)
async def test_the_openapi_document_lists_the_conditional_headers_and_answers(api):
    document = (await api.get("/openapi.json")).json()
    paths = document["paths"]
    one = paths["/api/recordings/{recording_id}"]

    def headers(operation: dict) -> set[str]:
        return {param["name"] for param in operation["parameters"] if param["in"] == "header"}

    def tagged(operation: dict) -> set[str]:
        return {status for status, answer in operation["responses"].items() if "ETag" in answer.get("headers", {})}

    assert [headers(one["get"]), headers(one["patch"]), headers(one["delete"])] == [
        {"If-None-Match"},
        {"If-Match"},
        {"If-Match"},
    ]
    assert tagged(paths["/api/recordings"]["post"]) == {"200", "201"}
    assert tagged(one["get"]) == {"200", "304"}
    assert tagged(one["patch"]) == {"200", "409", "412"}
    assert tagged(one["delete"]) == {"412"}
    assert "304" in one["get"]["responses"]
    assert "412" in one["patch"]["responses"]
    assert "412" in one["delete"]["responses"]
    assert "version" not in document["components"]["schemas"]["RecordingPatch"].get("required", [])
