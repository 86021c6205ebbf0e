"""Idempotency-Key on POST, PATCH and DELETE: a retry replays the first answer and does no work again."""

import asyncio
import threading
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client

from clinical.idempotency import KEY_INVALID, KEY_REUSED
from clinical.models import ChangeSequence, IdempotencyKey
from clinical.tokens import token_issue
from recordings.models import Recording

pytestmark = pytest.mark.django_db(transaction=True)

REPLAYED = "Idempotent-Replayed"
DUPLICATES = 8


def keyed(key: str) -> dict:
    return {"Idempotency-Key": key}


async def sequence_value() -> int:
    sequence = await ChangeSequence.objects.filter(pk=1).afirst()
    return sequence.value if sequence is not None else 0


async def stored(recording_id) -> Recording:
    return await Recording.objects.aget(pk=recording_id)


async def age_keys(by: timedelta) -> None:
    """Move every stored key's created_at back, as if `by` had passed."""
    async for stored_key in IdempotencyKey.objects.all():
        stored_key.created_at -= by
        await stored_key.asave(update_fields=["created_at"])


# Replay


async def test_a_repeated_create_replays_the_first_answer(api, alice):
    body = {"patient_ref": "PAT-1", "title": "Knee"}
    first = await api.post("/recordings", body, user=alice, headers=keyed("create-1"))
    sequence = await sequence_value()

    again = await api.post("/recordings", body, user=alice, headers=keyed("create-1"))

    assert first.status_code == 201
    assert REPLAYED not in first.headers
    assert again.status_code == 201
    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert await Recording.objects.acount() == 1
    assert await sequence_value() == sequence


async def test_without_a_key_the_same_create_does_the_work_twice(api, alice):
    body = {"patient_ref": "PAT-1"}

    first = await api.post("/recordings", body, user=alice)
    second = await api.post("/recordings", body, user=alice)

    assert first.json()["id"] != second.json()["id"]
    assert REPLAYED not in second.headers
    assert await Recording.objects.acount() == 2


async def test_different_keys_are_different_requests(api, alice):
    body = {"patient_ref": "PAT-1"}

    first = await api.post("/recordings", body, user=alice, headers=keyed("one"))
    second = await api.post("/recordings", body, user=alice, headers=keyed("two"))

    assert first.json()["id"] != second.json()["id"]
    assert REPLAYED not in second.headers
    assert await Recording.objects.acount() == 2


async def test_a_repeated_patch_replays_and_bumps_the_version_once(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    body = {"version": 1, "title": "Changed", "status": "uploaded"}
    first = await api.patch(f"/recordings/{recording.id}", body, user=alice, headers=keyed("patch-1"))
    sequence = await sequence_value()

    again = await api.patch(f"/recordings/{recording.id}", body, user=alice, headers=keyed("patch-1"))

    assert first.status_code == 200
    assert again.status_code == 200
    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert (await stored(recording.id)).version == 2
    assert await sequence_value() == sequence


async def test_a_replayed_patch_answers_what_it_answered_then_and_changes_nothing_now(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    body = {"version": 1, "title": "Second"}
    first = await api.patch(f"/recordings/{recording.id}", body, user=alice, headers=keyed("patch-1"))
    await api.patch(f"/recordings/{recording.id}", {"version": 2, "title": "Third"}, user=alice)

    again = await api.patch(f"/recordings/{recording.id}", body, user=alice, headers=keyed("patch-1"))

    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    current = await stored(recording.id)
    assert (current.version, current.title) == (3, "Third")


async def test_a_repeated_delete_replays_the_204_and_deletes_once(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    first = await api.delete(f"/recordings/{recording.id}", user=alice, headers=keyed("delete-1"))
    deleted = await stored(recording.id)
    sequence = await sequence_value()

    again = await api.delete(f"/recordings/{recording.id}", user=alice, headers=keyed("delete-1"))

    assert first.status_code == 204
    assert again.status_code == 204
    assert again.headers[REPLAYED] == "true"
    assert again.content == first.content
    after = await stored(recording.id)
    assert (after.version, after.deleted_at, after.change_seq) == (2, deleted.deleted_at, deleted.change_seq)
    assert await sequence_value() == sequence


async def test_a_replayed_create_is_a_create_not_a_retried_upload(api, alice):
    body = {"id": str(uuid.uuid4()), "patient_ref": "PAT-1"}
    first = await api.post("/recordings", body, user=alice, headers=keyed("upload"))

    again = await api.post("/recordings", body, user=alice, headers=keyed("upload"))
    retried_upload = await api.post("/recordings", body, user=alice)

    assert (first.status_code, again.status_code, retried_upload.status_code) == (201, 201, 200)
    assert again.headers[REPLAYED] == "true"
    assert REPLAYED not in retried_upload.headers


async def test_the_key_belongs_to_the_user_not_to_the_token(api, alice):
    body = {"patient_ref": "PAT-1"}
    first = await api.post("/recordings", body, user=alice, headers=keyed("k"))
    other_token = (await api.post("/auth/token", {"username": "alice", "password": "correct-horse-battery"})).json()

    again = await api.post("/recordings", body, token=other_token["token"], headers=keyed("k"))

    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert await Recording.objects.acount() == 1


# The same key for a different request


@pytest.mark.parametrize(
    "second",
    [
        {"method": "POST", "path": "/recordings", "json": {"patient_ref": "PAT-2"}},
        {"method": "POST", "path": "/recordings", "json": {"patient_ref": "PAT-1", "title": "x"}},
        {"method": "PATCH", "path": "/recordings/{id}", "json": {"version": 1, "title": "x"}},
        {"method": "DELETE", "path": "/recordings/{id}", "json": None},
    ],
    ids=["other-body", "extra-field", "other-method", "delete"],
)
async def test_the_same_key_for_a_different_request_is_a_422_and_does_nothing(api, alice, second):
    first = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice, headers=keyed("k"))
    recording = await stored(first.json()["id"])
    sequence = await sequence_value()
    path = second["path"].format(id=recording.id)

    response = await api.request(second["method"], path, second["json"], user=alice, headers=keyed("k"))

    assert response.status_code == 422
    assert response.json()["detail"] == KEY_REUSED
    assert REPLAYED not in response.headers
    assert await Recording.objects.acount() == 1
    after = await stored(recording.id)
    assert (after.version, after.title, after.deleted_at) == (1, recording.title, None)
    assert await sequence_value() == sequence


async def test_the_same_key_on_another_recording_is_a_422(api, alice, make_recording):
    first = await make_recording(owner=alice)
    second = await make_recording(owner=alice)
    body = {"version": 1, "title": "x"}
    await api.patch(f"/recordings/{first.id}", body, user=alice, headers=keyed("k"))

    response = await api.patch(f"/recordings/{second.id}", body, user=alice, headers=keyed("k"))

    assert response.status_code == 422
    assert response.json()["detail"] == KEY_REUSED
    assert (await stored(second.id)).version == 1


# Only successful answers are kept


async def test_a_refused_request_keeps_no_key_and_the_fixed_request_may_reuse_it(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    stale = await api.patch(f"/recordings/{recording.id}", {"version": 9, "title": "x"}, user=alice, headers=keyed("k"))

    fixed = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "x"}, user=alice, headers=keyed("k"))

    assert stale.status_code == 409
    assert fixed.status_code == 200
    assert REPLAYED not in fixed.headers
    assert (await stored(recording.id)).version == 2


async def test_the_same_refused_request_again_is_refused_again_not_replayed(api, alice):
    missing = uuid.uuid4()
    first = await api.delete(f"/recordings/{missing}", user=alice, headers=keyed("k"))

    again = await api.delete(f"/recordings/{missing}", user=alice, headers=keyed("k"))

    assert (first.status_code, again.status_code) == (404, 404)
    assert REPLAYED not in again.headers
    assert await IdempotencyKey.objects.acount() == 0


async def test_an_invalid_body_keeps_no_key(api, alice):
    invalid = await api.post("/recordings", {"patient_ref": ""}, user=alice, headers=keyed("k"))

    fixed = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice, headers=keyed("k"))

    assert invalid.status_code == 422
    assert fixed.status_code == 201
    assert REPLAYED not in fixed.headers


# Concurrent duplicates


async def test_concurrent_duplicate_creates_create_one_recording(api, alice):
    body = {"patient_ref": "PAT-1", "title": "Once"}
    await api.token_for(alice)

    answers = await asyncio.gather(
        *(api.post("/recordings", body, user=alice, headers=keyed("same")) for _ in range(DUPLICATES))
    )

    assert await Recording.objects.acount() == 1
    recording = await Recording.objects.aget()
    successes = [answer for answer in answers if answer.status_code == 201]
    assert {answer.status_code for answer in answers} <= {201, 409}
    assert {answer.json()["id"] for answer in successes} == {str(recording.id)}
    assert len([answer for answer in successes if REPLAYED not in answer.headers]) == 1
    assert recording.version == 1


async def test_concurrent_duplicate_patches_bump_the_version_once(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    body = {"version": 1, "title": "Once", "status": "uploaded"}
    path = f"/recordings/{recording.id}"
    sequence = await sequence_value()
    await api.token_for(alice)

    answers = await asyncio.gather(
        *(api.patch(path, body, user=alice, headers=keyed("same")) for _ in range(DUPLICATES))
    )

    successes = [answer for answer in answers if answer.status_code == 200]
    assert {answer.status_code for answer in answers} <= {200, 409}
    assert {answer.json()["version"] for answer in successes} == {2}
    assert len([answer for answer in successes if REPLAYED not in answer.headers]) == 1
    assert (await stored(recording.id)).version == 2
    assert await sequence_value() == sequence + 1


async def test_concurrent_duplicate_deletes_delete_once(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    path = f"/recordings/{recording.id}"
    sequence = await sequence_value()
    await api.token_for(alice)

    answers = await asyncio.gather(*(api.delete(path, user=alice, headers=keyed("same")) for _ in range(DUPLICATES)))

    assert {answer.status_code for answer in answers} <= {204, 409}
    assert len([answer for answer in answers if answer.status_code == 204 and REPLAYED not in answer.headers]) == 1
    assert (await stored(recording.id)).version == 2
    assert await sequence_value() == sequence + 1


def test_duplicates_on_separate_database_connections_do_the_work_once(alice):
    # The ASGI app runs every request on one database thread; here each duplicate has
    # a thread and a connection of its own, as with several server processes.
    token, _ = token_issue(user=alice)
    client_headers = {"HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_IDEMPOTENCY_KEY": "same"}
    start = threading.Barrier(DUPLICATES)
    answers = [None] * DUPLICATES

    def send(index: int) -> None:
        try:
            start.wait()
            answers[index] = Client().post(
                "/api/recordings", {"patient_ref": "PAT-1"}, content_type="application/json", **client_headers
            )
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(index,)) for index in range(DUPLICATES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert Recording.objects.count() == 1
    successes = [answer for answer in answers if answer.status_code == 201]
    assert {answer.status_code for answer in answers} <= {201, 409}
    assert {answer.json()["id"] for answer in successes} == {str(Recording.objects.get().id)}
    assert len([answer for answer in successes if not answer.has_header(REPLAYED)]) == 1


# Expiry


def test_keys_are_kept_at_least_24_hours():
    assert settings.CLINICAL_IDEMPOTENCY_TTL >= timedelta(hours=24)


async def test_a_key_inside_its_lifetime_still_replays(api, alice):
    body = {"patient_ref": "PAT-1"}
    first = await api.post("/recordings", body, user=alice, headers=keyed("k"))
    await age_keys(settings.CLINICAL_IDEMPOTENCY_TTL - timedelta(minutes=1))

    again = await api.post("/recordings", body, user=alice, headers=keyed("k"))

    assert again.headers[REPLAYED] == "true"
    assert again.json() == first.json()
    assert await Recording.objects.acount() == 1


async def test_an_expired_key_does_the_work_again(api, alice):
    body = {"patient_ref": "PAT-1"}
    first = await api.post("/recordings", body, user=alice, headers=keyed("k"))
    await age_keys(settings.CLINICAL_IDEMPOTENCY_TTL + timedelta(seconds=1))

    again = await api.post("/recordings", body, user=alice, headers=keyed("k"))

    assert again.status_code == 201
    assert REPLAYED not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert await Recording.objects.acount() == 2


async def test_an_expired_key_is_free_for_a_different_request(api, alice):
    await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice, headers=keyed("k"))
    await age_keys(settings.CLINICAL_IDEMPOTENCY_TTL + timedelta(seconds=1))

    other = await api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice, headers=keyed("k"))
    again = await api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice, headers=keyed("k"))

    assert other.status_code == 201
    assert REPLAYED not in other.headers
    assert again.headers[REPLAYED] == "true"
    assert again.json() == other.json()


# Scope and shape of the key


async def test_keys_are_per_user(api, alice, bob):
    body = {"patient_ref": "PAT-1"}
    alices = await api.post("/recordings", body, user=alice, headers=keyed("shared"))

    bobs = await api.post("/recordings", body, user=bob, headers=keyed("shared"))
    bobs_other = await api.post("/recordings", {"patient_ref": "PAT-2"}, user=bob, headers=keyed("alice-only"))
    alices_again = await api.post("/recordings", body, user=alice, headers=keyed("shared"))

    assert bobs.status_code == 201
    assert REPLAYED not in bobs.headers
    assert bobs.json()["owner"] == "bob"
    assert bobs.json()["id"] != alices.json()["id"]
    assert bobs_other.status_code == 201
    assert alices_again.headers[REPLAYED] == "true"
    assert alices_again.json() == alices.json()
    assert await Recording.objects.filter(owner=bob).acount() == 2


async def test_another_users_key_never_replays_their_answer(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    path = f"/recordings/{recording.id}"
    await api.patch(path, {"version": 1, "title": "alice's"}, user=alice, headers=keyed("k"))

    response = await api.patch(path, {"version": 1, "title": "alice's"}, user=bob, headers=keyed("k"))

    assert response.status_code == 404
    assert "title" not in response.json()
    assert REPLAYED not in response.headers


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/recordings", {"patient_ref": "PAT-1"}),
        ("PATCH", "/recordings/{id}", {"version": 1, "title": "x"}),
        ("DELETE", "/recordings/{id}", None),
    ],
)
async def test_a_key_longer_than_255_characters_is_a_422_and_does_nothing(
    api, alice, make_recording, method, path, body
):
    recording = await make_recording(owner=alice)
    sequence = await sequence_value()

    response = await api.request(method, path.format(id=recording.id), body, user=alice, headers=keyed("k" * 256))

    assert response.status_code == 422
    assert response.json()["detail"] == KEY_INVALID
    assert await Recording.objects.acount() == 1
    assert (await stored(recording.id)).version == 1
    assert await sequence_value() == sequence


async def test_a_key_of_255_characters_is_accepted(api, alice):
    key = "k" * 255
    first = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice, headers=keyed(key))

    again = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice, headers=keyed(key))

    assert first.status_code == 201
    assert again.headers[REPLAYED] == "true"


# Stored answers hold patient data: dropped with the recording, bounded per user


async def test_a_deleted_recordings_stored_answers_are_not_replayed(api, alice):
    body = {"patient_ref": "PAT-GONE", "transcript": "private words"}
    created = await api.post("/recordings", body, user=alice, headers=keyed("create-gone"))
    path = f"/recordings/{created.json()['id']}"
    await api.patch(path, {"version": 1, "title": "Knee"}, user=alice, headers=keyed("patch-gone"))
    await api.delete(path, user=alice, headers=keyed("delete-gone"))

    patch_again = await api.patch(path, {"version": 1, "title": "Knee"}, user=alice, headers=keyed("patch-gone"))
    create_again = await api.post("/recordings", body, user=alice, headers=keyed("create-gone"))
    delete_again = await api.delete(path, user=alice, headers=keyed("delete-gone"))

    assert patch_again.status_code == 404
    assert create_again.status_code == 201  # a new recording: the first one is gone
    assert create_again.json()["id"] != created.json()["id"]
    assert delete_again.status_code == 204
    assert delete_again.headers[REPLAYED] == "true"
    assert "private words" not in patch_again.text
    assert not await IdempotencyKey.objects.filter(recording_id=created.json()["id"]).aexists()


async def test_stored_answers_are_bounded_per_user_and_still_replay(api, alice, bob, settings):
    settings.CLINICAL_IDEMPOTENCY_MAX_BYTES_PER_USER = 5_000
    answers = []
    for index in range(6):
        body = {"patient_ref": f"PAT-{index}", "transcript": "x" * 1_500}
        answers.append((body, await api.post("/recordings", body, user=alice, headers=keyed(f"big-{index}"))))
    bobs = await api.post(
        "/recordings", {"patient_ref": "PAT-B", "transcript": "y" * 1_500}, user=bob, headers=keyed("b")
    )

    replays = [
        await api.post("/recordings", body, user=alice, headers=keyed(f"big-{i}"))
        for i, (body, _) in enumerate(answers)
    ]

    sizes = [key.size async for key in IdempotencyKey.objects.filter(user=alice)]
    assert sum(sizes) <= 5_000
    assert sizes.count(0) >= 3  # past the budget: the recording's id only
    assert [replay.json() for replay in replays] == [first.json() for _, first in answers]
    assert {replay.headers[REPLAYED] for replay in replays} == {"true"}
    assert (await IdempotencyKey.objects.aget(user=bob)).size == len(bobs.content)
    assert await Recording.objects.acount() == 7
