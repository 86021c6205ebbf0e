"""Every answer that carries a recording matches the documented schema, whichever endpoint gives it.

The API renders its own rows and services' results with orjson, without a
second validation by django-ninja: these tests hold each answer to the
response schemas that /api/docs publishes.
"""

import uuid

import pytest

from recordings.schemas import ChangesOut, RecordingList, RecordingOut

pytestmark = pytest.mark.django_db(transaction=True)

FULL = {
    "patient_ref": "PAT-7",
    "title": "Knee review",
    "note_type": "follow-up",
    "status": "uploaded",
    "audio_path": "audio/7.webm",
    "duration_seconds": 61.25,
    "transcript": 'Ünïcode and "quotes" and a new\nline',
    "verification_results": {"checked": True, "score": 0.5, "flags": ["a", {"nested": [1, 2.5, None]}]},
    "recorded_at": "2024-05-01T10:00:00.123456+02:00",
}


def conforms(body: dict) -> bool:
    """The documented recording: every field, nothing more, each of its type."""
    RecordingOut.model_validate(body)
    return set(body) == set(RecordingOut.model_fields)


# Times with and without a fraction of a second, and none: each endpoint writes them alike.
@pytest.mark.parametrize("recorded_at", [FULL["recorded_at"], "2024-05-01T10:00:00Z", None])
async def test_every_endpoint_answers_the_same_recording_in_the_same_shape(api, alice, recorded_at):
    created = await api.post("/recordings", {"id": str(uuid.uuid4()), **FULL, "recorded_at": recorded_at}, user=alice)
    recording_id = created.json()["id"]

    got = await api.get(f"/recordings/{recording_id}", user=alice)
    listed = await api.get("/recordings", user=alice)
    retried = await api.post("/recordings", {"id": recording_id, **FULL, "recorded_at": recorded_at}, user=alice)
    fed = await api.get("/sync/changes", user=alice)

    assert [created.status_code, got.status_code, listed.status_code, retried.status_code] == [201, 200, 200, 200]
    body = created.json()
    assert conforms(body)
    assert got.json() == body
    assert listed.json() == {"items": [body], "count": 1}
    assert RecordingList.model_validate(listed.json())
    assert retried.json() == body
    change = fed.json()["changes"][0]
    assert ChangesOut.model_validate(fed.json())
    assert change == {**body, "deleted": False, "change_seq": change["change_seq"]}


async def test_values_are_rendered_as_the_contract_says(api, alice):
    body = (await api.post("/recordings", FULL, user=alice)).json()

    assert uuid.UUID(body["id"]) and len(body["id"]) == 36
    assert body["recorded_at"] == "2024-05-01T08:00:00.123456+00:00"
    assert body["created_at"].endswith("+00:00")
    assert body["verification_results"] == FULL["verification_results"]
    assert body["duration_seconds"] == 61.25
    assert body["transcript"] == FULL["transcript"]
    assert body["owner"] == "alice"

    got = (await api.get(f"/recordings/{body['id']}", user=alice)).json()
    assert got["recorded_at"] == body["recorded_at"]
    assert got["created_at"] == body["created_at"]


async def test_a_patch_and_a_conflict_answer_in_the_same_shape(api, alice):
    body = (await api.post("/recordings", FULL, user=alice)).json()

    patched = await api.patch(f"/recordings/{body['id']}", {"version": 1, "title": "Changed"}, user=alice)
    stale = await api.patch(f"/recordings/{body['id']}", {"version": 1, "title": "Again"}, user=alice)

    assert patched.status_code == 200
    assert conforms(patched.json())
    moved = {"updated_at": patched.json()["updated_at"], "digest": patched.json()["digest"]}
    assert patched.json() == {**body, "title": "Changed", "version": 2, **moved}
    assert patched.json()["digest"] != body["digest"]
    assert stale.status_code == 409
    current = stale.json()["current"]
    assert current == patched.json()
    assert {key: stale.json()[key] for key in current} == current


async def test_tombstones_carry_only_what_the_schema_names(api, alice):
    body = (await api.post("/recordings", FULL, user=alice)).json()
    await api.delete(f"/recordings/{body['id']}", user=alice)

    fed = (await api.get("/sync/changes", user=alice)).json()

    (tombstone,) = fed["changes"]
    assert ChangesOut.model_validate(fed)
    assert set(tombstone) == {"id", "deleted", "owner", "version", "change_seq", "updated_at", "deleted_at", "digest"}
    assert tombstone["deleted"] is True
    assert tombstone["deleted_at"].endswith("+00:00")


async def test_an_idempotent_replay_answers_the_bytes_of_the_first_answer(api, alice):
    headers = {"Idempotency-Key": "k-1"}
    first = await api.post("/recordings", FULL, user=alice, headers=headers)
    again = await api.post("/recordings", FULL, user=alice, headers=headers)

    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert conforms(first.json())
