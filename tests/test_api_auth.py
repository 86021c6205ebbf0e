"""Bearer tokens: login, revocation, and every protected endpoint refusing a bad token."""

import hashlib
import os
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import AsyncClient
from django.urls import reverse

from clinical.api import BAD_CREDENTIALS
from clinical.models import AuditEvent, ChangeSequence, Token
from clinical.responses import json_response
from clinical.tokens import UNAUTHORIZED, UncheckedToken, answer_unchecked
from recordings.models import Recording

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct-horse-battery"


def sha256(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


async def token_row(raw: str) -> Token:
    return await Token.objects.aget(key_hash=sha256(raw))


async def snapshot() -> dict:
    """Everything a request could have changed."""
    return {
        "recordings": [row async for row in Recording.objects.order_by("pk").values()],
        "tokens": [row async for row in Token.objects.order_by("pk").values()],
        "sequence": [row async for row in ChangeSequence.objects.values()],
        "users": [row async for row in get_user_model().objects.order_by("pk").values()],
        "audit": [row async for row in AuditEvent.objects.order_by("pk").values()],
    }


async def call_every_protected_endpoint(api, recording_id, headers: dict) -> dict:
    path = f"/recordings/{recording_id}"
    return {
        "list": await api.get("/recordings", headers=headers),
        "changes": await api.get("/sync/changes?since=0", headers=headers),
        "create": await api.post("/recordings", {"patient_ref": "PAT-NEW"}, headers=headers),
        "get": await api.get(path, headers=headers),
        "patch": await api.patch(path, {"version": 1, "title": "changed"}, headers=headers),
        "delete": await api.delete(path, headers=headers),
        "tokens": await api.get("/auth/tokens", headers=headers),
        "revoke-one": await api.delete("/auth/tokens/999999", headers=headers),
        "revoke": await api.delete("/auth/token", headers=headers),
    }


def assert_all_unauthorized(answers: dict) -> None:
    assert {name: response.status_code for name, response in answers.items()} == dict.fromkeys(answers, 401)
    assert {name: response.json()["detail"] for name, response in answers.items()} == dict.fromkeys(
        answers, UNAUTHORIZED
    )
    assert {name: response.headers.get("www-authenticate") for name, response in answers.items()} == dict.fromkeys(
        answers, "Bearer"
    )


# Login


async def test_login_issues_a_token_that_works(api, alice):
    before = datetime.now(UTC)

    response = await api.post("/auth/token", {"username": "alice", "password": PASSWORD})

    body = response.json()
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert response.status_code == 201
    assert set(body) == {"token", "expires_at"}
    assert before + settings.CLINICAL_TOKEN_TTL <= expires_at <= datetime.now(UTC) + settings.CLINICAL_TOKEN_TTL
    assert (await api.get("/recordings", token=body["token"])).status_code == 200


async def test_each_login_issues_a_different_token(api, alice):
    first = await api.post("/auth/token", {"username": "alice", "password": PASSWORD})
    second = await api.post("/auth/token", {"username": "alice", "password": PASSWORD})

    assert first.json()["token"] != second.json()["token"]
    assert await Token.objects.filter(user=alice).acount() == 2


async def test_token_lifetime_defaults_to_12_hours(api, alice):
    if "CLINICAL_TOKEN_TTL_HOURS" in os.environ:
        pytest.skip("CLINICAL_TOKEN_TTL_HOURS overrides the default")
    response = await api.post("/auth/token", {"username": "alice", "password": PASSWORD})

    token = await token_row(response.json()["token"])
    assert settings.CLINICAL_TOKEN_TTL == timedelta(hours=12)
    assert token.expires_at - token.created_at == timedelta(hours=12)


@pytest.mark.parametrize(
    "credentials",
    [
        {"username": "alice", "password": "wrong"},
        {"username": "alice", "password": ""},
        {"username": "ALICE", "password": PASSWORD},
        {"username": "nobody", "password": PASSWORD},
        {"username": "", "password": ""},
    ],
    ids=["wrong-password", "empty-password", "wrong-case", "unknown-user", "empty"],
)
async def test_wrong_credentials_are_a_401(api, alice, credentials):
    response = await api.post("/auth/token", credentials)

    assert response.status_code == 401
    assert response.json()["detail"] == BAD_CREDENTIALS
    assert "token" not in response.json()
    assert await Token.objects.acount() == 0


async def test_inactive_user_cannot_log_in(api, make_user):
    make_user_async = sync_to_async(make_user)
    await make_user_async("carol", is_active=False)

    response = await api.post("/auth/token", {"username": "carol", "password": PASSWORD})

    assert response.status_code == 401
    assert response.json()["detail"] == BAD_CREDENTIALS
    assert await Token.objects.acount() == 0


async def test_wrong_password_and_unknown_user_answer_alike(api, alice):
    wrong = await api.post("/auth/token", {"username": "alice", "password": "wrong"})
    unknown = await api.post("/auth/token", {"username": "nobody", "password": "wrong"})

    assert (wrong.status_code, wrong.json()) == (unknown.status_code, unknown.json())


@pytest.mark.parametrize(
    "body",
    [{}, {"username": "alice"}, {"password": PASSWORD}, {"username": None, "password": PASSWORD}, {"username": ["a"]}],
    ids=["empty", "no-password", "no-username", "null-username", "list-username"],
)
async def test_login_with_missing_or_malformed_fields_is_a_422(api, alice, body):
    response = await api.post("/auth/token", body)

    assert response.status_code == 422
    assert "detail" in response.json()
    assert await Token.objects.acount() == 0


async def test_login_with_an_absurdly_long_password_is_refused_quickly(api, alice):
    response = await api.post("/auth/token", {"username": "alice", "password": "x" * 100_000})

    assert response.status_code in (401, 422)
    assert await Token.objects.acount() == 0


# Revocation


async def test_revoking_a_token_answers_204_then_the_token_is_refused(api, alice):
    raw = await api.token_for(alice)

    revoked = await api.delete("/auth/token", token=raw)
    after = await api.get("/recordings", token=raw)

    assert revoked.status_code == 204
    assert revoked.content == b""
    assert after.status_code == 401
    assert (await token_row(raw)).revoked_at is not None


async def test_revoking_one_token_leaves_the_others(api, alice):
    first = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    second = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]

    await api.delete("/auth/token", token=first)

    assert (await api.get("/recordings", token=first)).status_code == 401
    assert (await api.get("/recordings", token=second)).status_code == 200


async def test_revoking_twice_is_refused_the_second_time(api, alice):
    raw = await api.token_for(alice)
    await api.delete("/auth/token", token=raw)
    revoked_at = (await token_row(raw)).revoked_at

    again = await api.delete("/auth/token", token=raw)

    assert again.status_code == 401
    assert (await token_row(raw)).revoked_at == revoked_at


# Bad tokens on every protected endpoint


async def bad_token_headers(api, kind: str, alice) -> dict:
    if kind == "missing":
        return {}
    if kind == "bearer-alone":
        return {"Authorization": "Bearer"}
    if kind == "bearer-empty":
        return {"Authorization": "Bearer "}
    if kind == "basic":
        return {"Authorization": "Basic YWxpY2U6Y29ycmVjdC1ob3JzZS1iYXR0ZXJ5"}
    if kind == "wrong":
        return {"Authorization": "Bearer " + "x" * 43}
    if kind == "non-ascii":
        return {"Authorization": b"Bearer \xff\xfe\xe9t\xe9"}
    if kind == "too-long":
        return {"Authorization": "Bearer " + "x" * 5000}
    if kind == "hash-as-token":
        raw = await api.token_for(alice)
        return {"Authorization": f"Bearer {sha256(raw)}"}
    raw = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    if kind == "expired":
        await Token.objects.filter(key_hash=sha256(raw)).aupdate(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    elif kind == "revoked":
        await api.delete("/auth/token", token=raw)
    elif kind == "inactive-user":
        await get_user_model().objects.filter(pk=alice.pk).aupdate(is_active=False)
    return {"Authorization": f"Bearer {raw}"}


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "bearer-alone",
        "bearer-empty",
        "basic",
        "wrong",
        "too-long",
        "non-ascii",
        "hash-as-token",
        "expired",
        "revoked",
        "inactive-user",
    ],
)
async def test_a_bad_token_is_refused_by_every_protected_endpoint(api, alice, make_recording, kind):
    recording = await make_recording(owner=alice)
    headers = await bad_token_headers(api, kind, alice)
    before = await snapshot()

    answers = await call_every_protected_endpoint(api, recording.id, headers)

    assert_all_unauthorized(answers)
    assert await snapshot() == before


async def call_every_protected_endpoint_with_bad_input(api, recording_id, headers: dict) -> dict:
    path = f"/recordings/{recording_id}"
    long_key = {**headers, "Idempotency-Key": "k" * 256}
    return {
        "list": await api.get("/recordings?limit=0", headers=headers),
        "changes": await api.get("/sync/changes?since=-1", headers=headers),
        "create": await api.post("/recordings", {"patient_ref": " "}, headers=headers),
        "create-not-json": await api.request("POST", "/recordings", content=b"{not json", headers=headers),
        "create-bad-key": await api.post("/recordings", {"patient_ref": "PAT-NEW"}, headers=long_key),
        "get": await api.get("/recordings/not-a-uuid", headers=headers),
        "patch": await api.patch(path, {"version": "one"}, headers=headers),
        "delete-bad-key": await api.delete(path, headers=long_key),
    }


@pytest.mark.parametrize("kind", ["missing", "wrong", "expired", "revoked", "inactive-user"])
async def test_a_bad_token_is_refused_before_the_input_is_judged(api, alice, make_recording, kind):
    recording = await make_recording(owner=alice)
    headers = await bad_token_headers(api, kind, alice)
    before = await snapshot()

    answers = await call_every_protected_endpoint_with_bad_input(api, recording.id, headers)

    assert_all_unauthorized(answers)
    assert await snapshot() == before


async def test_a_401_for_bad_input_carries_the_same_headers_as_any_401(api, alice):
    headers = {"Authorization": "Bearer " + "x" * 43}

    plain = await api.get("/recordings", headers=headers)
    late = await api.get("/recordings?limit=0", headers=headers)

    assert plain.status_code == late.status_code == 401
    assert plain.json() == late.json()
    names = {"x-content-type-options", "x-frame-options", "referrer-policy", "cache-control", "www-authenticate"}
    assert {name: late.headers.get(name) for name in names} == {name: plain.headers.get(name) for name in names}
    assert None not in {late.headers.get(name) for name in names}


async def test_with_a_good_token_the_same_input_is_refused_as_bad_input(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    headers = {"Authorization": f"Bearer {await api.token_for(alice)}"}

    answers = await call_every_protected_endpoint_with_bad_input(api, recording.id, headers)

    assert {name: response.status_code for name, response in answers.items()} == {
        "list": 422,
        "changes": 422,
        "create": 422,
        "create-not-json": 400,
        "create-bad-key": 422,
        "get": 422,
        "patch": 422,
        "delete-bad-key": 422,
    }


async def test_a_good_token_passes_every_protected_endpoint(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    raw = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]

    answers = await call_every_protected_endpoint(api, recording.id, {"Authorization": f"Bearer {raw}"})

    assert {name: response.status_code for name, response in answers.items()} == {
        "list": 200,
        "changes": 200,
        "create": 201,
        "get": 200,
        "patch": 200,
        "delete": 204,
        "tokens": 200,
        "revoke-one": 404,
        "revoke": 204,
    }


async def test_a_token_expires_at_its_expiry_time(api, alice):
    raw = await api.token_for(alice)
    await Token.objects.filter(key_hash=sha256(raw)).aupdate(expires_at=datetime.now(UTC) + timedelta(seconds=30))
    still_valid = await api.get("/recordings", token=raw)
    await Token.objects.filter(key_hash=sha256(raw)).aupdate(expires_at=datetime.now(UTC))

    expired = await api.get("/recordings", token=raw)

    assert still_valid.status_code == 200
    assert expired.status_code == 401


async def test_the_scheme_is_case_insensitive_but_the_token_is_not(api, alice):
    raw = await api.token_for(alice)

    lower = await api.get("/recordings", headers={"Authorization": f"bearer {raw}"})
    swapped = await api.get("/recordings", headers={"Authorization": f"Bearer {raw.swapcase()}"})

    assert lower.status_code == 200
    assert swapped.status_code == 401


async def test_a_token_only_ever_acts_for_its_own_user(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    raw = await api.token_for(bob)

    response = await api.get(f"/recordings/{recording.id}", token=raw)

    assert response.status_code == 404


# What is stored


async def test_only_a_sha256_of_the_token_is_stored(api, alice):
    response = await api.post("/auth/token", {"username": "alice", "password": PASSWORD})
    raw = response.json()["token"]

    rows = [row async for row in Token.objects.values()]

    assert len(rows) == 1
    assert rows[0]["key_hash"] == sha256(raw)
    assert all(raw not in str(value) for row in rows for value in row.values())
    assert len(raw) >= 32


# Public endpoints and docs


async def test_health_needs_no_token(api):
    response = await api.get("/health")

    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_health_ignores_a_bad_token(api):
    response = await api.get("/health", headers={"Authorization": "Bearer nonsense"})

    assert response.status_code == 200


async def test_docs_page_is_served_and_points_at_the_schema(api):
    response = await api.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/api/openapi.json" in response.text


async def test_openapi_lists_every_endpoint(api):
    response = await api.get("/openapi.json")

    paths = response.json()["paths"]
    assert response.status_code == 200
    assert {path: set(operations) for path, operations in paths.items()} == {
        "/api/health": {"get"},
        "/api/auth/token": {"post", "delete"},
        "/api/auth/tokens": {"get"},
        "/api/auth/tokens/{token_id}": {"delete"},
        "/api/recordings": {"get", "post"},
        "/api/recordings/{recording_id}": {"get", "patch", "delete"},
        "/api/sync/changes": {"get"},
    }


async def test_openapi_declares_the_bearer_scheme_on_protected_endpoints_only(api):
    schema = (await api.get("/openapi.json")).json()

    schemes = schema["components"]["securitySchemes"]
    secured = {
        (path, method): bool(operation.get("security"))
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    }
    assert [(scheme["type"], scheme["scheme"]) for scheme in schemes.values()] == [("http", "bearer")]
    assert secured.pop(("/api/health", "get")) is False
    assert secured.pop(("/api/auth/token", "post")) is False
    assert secured == dict.fromkeys(secured, True)
    assert len(secured) >= 6


async def test_unknown_recording_still_needs_a_token(api):
    response = await api.get(f"/recordings/{uuid.uuid4()}")

    assert response.status_code == 401


async def test_last_used_is_stamped_at_most_once_a_minute(api, alice):
    raw = await api.token_for(alice)
    assert (await token_row(raw)).last_used_at is None

    await api.get("/recordings", token=raw)
    first = (await token_row(raw)).last_used_at
    await api.get("/recordings", token=raw)
    second = (await token_row(raw)).last_used_at
    two_minutes_ago = datetime.now(UTC) - timedelta(minutes=2)
    await Token.objects.filter(key_hash=sha256(raw)).aupdate(last_used_at=two_minutes_ago)
    await api.get("/recordings", token=raw)
    third = (await token_row(raw)).last_used_at

    assert first is not None and first > two_minutes_ago
    assert second == first
    assert third > two_minutes_ago + timedelta(minutes=1)


async def test_an_answer_given_before_the_token_was_checked_gets_it_checked(api, alice):
    good = UncheckedToken(await api.token_for(alice))
    refused = json_response({"detail": "bad input"}, status=422)

    assert await answer_unchecked(SimpleNamespace(auth=good), refused) is refused
    assert (await answer_unchecked(SimpleNamespace(auth=UncheckedToken("x" * 43)), refused)).status_code == 401


async def test_a_server_error_stands_and_a_success_without_a_check_is_refused(alice):
    unavailable = json_response({"detail": "down"}, status=503)
    success = json_response({}, status=200)

    assert await answer_unchecked(SimpleNamespace(auth=UncheckedToken("x" * 43)), unavailable) is unavailable
    with pytest.raises(RuntimeError, match="as_user"):
        await answer_unchecked(SimpleNamespace(auth=UncheckedToken("x" * 43)), success)


# A password change revokes the user's tokens; clinicians list and revoke their own


async def test_a_password_changed_in_the_shell_refuses_the_old_tokens(api, alice):
    token = await api.token_for(alice)
    assert (await api.get("/recordings", token=token)).status_code == 200

    alice.set_password("a brand new passphrase")
    await alice.asave()

    assert (await api.get("/recordings", token=token)).status_code == 401
    assert (await api.get("/auth/tokens", token=token)).status_code == 401
    fresh = await api.post("/auth/token", {"username": "alice", "password": "a brand new passphrase"})
    assert (await api.get("/recordings", token=fresh.json()["token"])).status_code == 200


async def test_a_password_changed_in_the_admin_refuses_the_old_tokens(api, alice, make_user):
    token = await api.token_for(alice)
    staffer = await sync_to_async(make_user)("staffer", is_staff=True, is_superuser=True)
    client = AsyncClient()
    await client.aforce_login(staffer)
    url = reverse("admin:auth_user_password_change", args=[alice.pk])
    new = "another long passphrase 42"

    response = await client.post(url, {"password1": new, "password2": new, "usable_password": "true"})

    assert response.status_code == 302
    assert (await api.get("/recordings", token=token)).status_code == 401


async def test_the_token_list_shows_own_live_tokens_without_their_secret(api, alice, bob):
    first = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    second = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    revoked = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    await api.delete("/auth/token", token=revoked)
    await api.token_for(bob)

    response = await api.get("/auth/tokens", token=second)

    items = response.json()["items"]
    assert response.status_code == 200
    assert [item["current"] for item in items] == [True, False]
    assert {item["id"] for item in items} == {
        token.pk async for token in Token.objects.filter(key_hash__in=[sha256(first), sha256(second)])
    }
    assert set(items[0]) == {"id", "created_at", "last_used_at", "expires_at", "current"}
    assert first not in response.text and sha256(first) not in response.text


async def test_a_clinician_revokes_a_lost_devices_token_and_keeps_their_own(api, alice):
    tablet = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    phone = (await api.post("/auth/token", {"username": "alice", "password": PASSWORD})).json()["token"]
    tablet_id = (await Token.objects.aget(key_hash=sha256(tablet))).pk

    response = await api.delete(f"/auth/tokens/{tablet_id}", token=phone)

    assert response.status_code == 204
    assert (await api.get("/recordings", token=tablet)).status_code == 401
    assert (await api.get("/recordings", token=phone)).status_code == 200
    assert await AuditEvent.objects.filter(action="token_revoked", username="alice").acount() == 1


@pytest.mark.parametrize("token_id", ["other", "unknown", "huge"])
async def test_another_users_token_cannot_be_revoked_and_answers_404(api, alice, bob, token_id):
    bobs = await api.token_for(bob)
    ids = {
        "other": (await Token.objects.aget(key_hash=sha256(bobs))).pk,
        "unknown": 10_000,
        "huge": 2**63 - 1,
    }
    await api.get("/auth/tokens", user=alice)  # its first use is stamped
    before = await snapshot()

    response = await api.delete(f"/auth/tokens/{ids[token_id]}", user=alice)

    assert response.status_code == 404
    assert await snapshot() == before
    assert (await api.get("/recordings", token=bobs)).status_code == 200


async def test_a_token_id_out_of_range_is_a_422(api, alice):
    response = await api.delete(f"/auth/tokens/{2**64}", user=alice)

    assert response.status_code == 422
