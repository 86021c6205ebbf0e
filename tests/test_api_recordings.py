"""The recordings API: create, list, get, patch and delete, through the whole ASGI stack."""

import asyncio
import sys
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import sync_to_async

from clinical.models import ChangeSequence
from recordings.models import Recording
from recordings.schemas import CONTROL_CHARACTER, NOT_NULL, PATIENT_REF_CONTROL, PATIENT_REF_LENGTH
from recordings.services import ID_DELETED, ID_TAKEN, STALE_VERSION, recording_create, transition_refused

pytestmark = pytest.mark.django_db(transaction=True)

# The SPEC's transition table, written out here rather than read from the code under test.
ALLOWED = {
    "pending": {"uploaded", "failed"},
    "uploaded": {"transcribing", "failed"},
    "transcribing": {"transcribed", "failed"},
    "transcribed": {"verified", "transcribing", "failed"},
    "failed": {"pending"},
    "verified": set(),
}
STATUSES = list(ALLOWED)
ALLOWED_PAIRS = [(old, new) for old in STATUSES for new in sorted(ALLOWED[old])]
REFUSED_PAIRS = [(old, new) for old in STATUSES for new in STATUSES if new != old and new not in ALLOWED[old]]

RECORDING_KEYS = {
    "id",
    "patient_ref",
    "title",
    "note_type",
    "status",
    "audio_path",
    "duration_seconds",
    "transcript",
    "verification_results",
    "error",
    "recorded_at",
    "owner",
    "created_at",
    "updated_at",
    "version",
    "digest",
}


async def stored(recording_id) -> Recording:
    return await Recording.objects.aget(pk=recording_id)


async def row(recording_id) -> dict:
    return await Recording.objects.filter(pk=recording_id).values().aget()


async def sequence_value() -> int:
    sequence = await ChangeSequence.objects.filter(pk=1).afirst()
    return sequence.value if sequence is not None else 0


async def set_status(recording, status: str):
    await Recording.objects.filter(pk=recording.id).aupdate(status=status)
    return await stored(recording.id)


async def make_many(owner, count: int, **fields) -> list[Recording]:
    def create():
        return [recording_create(owner=owner, patient_ref=f"PAT-{i:05}", **fields)[0] for i in range(count)]

    return await sync_to_async(create)()


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def error_messages(response) -> str:
    return " ".join(error["msg"] for error in response.json()["detail"])


# Create


async def test_create_answers_201_with_the_recording(api, alice):
    response = await api.post("/recordings", {"patient_ref": "PAT-1", "title": "Knee"}, user=alice)

    body = response.json()
    assert response.status_code == 201
    assert set(body) == RECORDING_KEYS
    assert body["patient_ref"] == "PAT-1"
    assert body["title"] == "Knee"
    assert body["owner"] == "alice"
    assert body["version"] == 1
    assert (await stored(body["id"])).owner_id == alice.pk


async def test_create_chooses_an_id_when_the_client_does_not(api, alice):
    first = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)
    second = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)

    assert uuid.UUID(first.json()["id"]) != uuid.UUID(second.json()["id"])
    assert await Recording.objects.acount() == 2


async def test_create_keeps_the_id_the_client_chose(api, alice):
    chosen = uuid.uuid4()

    response = await api.post("/recordings", {"id": str(chosen), "patient_ref": "PAT-1"}, user=alice)

    assert response.status_code == 201
    assert response.json()["id"] == str(chosen)
    assert await Recording.objects.filter(pk=chosen).aexists()


async def test_create_fills_in_the_defaults(api, alice):
    before = datetime.now(UTC)

    response = await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)

    body = response.json()
    assert body["title"] == ""
    assert body["note_type"] == "general"
    assert body["status"] == "pending"
    assert body["audio_path"] == ""
    assert body["duration_seconds"] is None
    assert body["transcript"] == ""
    assert body["verification_results"] == {}
    assert body["error"] == ""
    assert body["recorded_at"] is None
    assert body["version"] == 1
    assert body["created_at"] == body["updated_at"]
    assert utc(body["created_at"]).utcoffset() == timedelta(0)
    assert before <= utc(body["created_at"]) <= datetime.now(UTC)


async def test_create_stores_every_field_given(api, alice):
    payload = {
        "patient_ref": "PAT-7",
        "title": "Discharge",
        "note_type": "discharge",
        "status": "uploaded",
        "audio_path": "audio/2024/rec.webm",
        "duration_seconds": 12.5,
        "transcript": "Patient is well.",
        "verification_results": [{"term": "well", "ok": True}],
        "error": "",
        "recorded_at": "2024-03-01T10:00:00+02:00",
    }

    response = await api.post("/recordings", payload, user=alice)

    body = response.json()
    assert response.status_code == 201
    assert {key: body[key] for key in payload if key != "recorded_at"} == {
        key: value for key, value in payload.items() if key != "recorded_at"
    }
    assert utc(body["recorded_at"]) == datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    assert utc(body["recorded_at"]).utcoffset() == timedelta(0)
    assert (await stored(body["id"])).recorded_at == datetime(2024, 3, 1, 8, 0, tzinfo=UTC)


async def test_create_accepts_the_initial_statuses(api, alice):
    answers = {
        status: (await api.post("/recordings", {"patient_ref": "PAT-1", "status": status}, user=alice)).json()
        for status in ["pending", "uploaded"]
    }

    assert {status: body["status"] for status, body in answers.items()} == {
        "pending": "pending",
        "uploaded": "uploaded",
    }
    assert await Recording.objects.acount() == 2


async def test_create_refuses_any_other_initial_status(api, alice):
    refused = ["transcribing", "transcribed", "verified", "failed", "bogus", "", None]

    answers = {
        status: (await api.post("/recordings", {"patient_ref": "PAT-1", "status": status}, user=alice)).status_code
        for status in refused
    }

    assert answers == dict.fromkeys(refused, 422)
    assert await Recording.objects.acount() == 0


async def test_retried_create_answers_200_with_the_stored_recording(api, alice):
    chosen = str(uuid.uuid4())
    first = await api.post("/recordings", {"id": chosen, "patient_ref": "PAT-1", "title": "First"}, user=alice)
    before = await row(chosen)

    retried = await api.post("/recordings", {"id": chosen, "patient_ref": "PAT-2", "title": "Second"}, user=alice)

    assert first.status_code == 201
    assert retried.status_code == 200
    assert retried.json() == first.json()
    assert await row(chosen) == before
    assert await Recording.objects.acount() == 1


async def test_retried_create_returns_the_current_state_after_a_change(api, alice):
    chosen = str(uuid.uuid4())
    await api.post("/recordings", {"id": chosen, "patient_ref": "PAT-1"}, user=alice)
    patched = await api.patch(f"/recordings/{chosen}", {"version": 1, "status": "uploaded"}, user=alice)

    retried = await api.post("/recordings", {"id": chosen, "patient_ref": "PAT-1"}, user=alice)

    assert retried.status_code == 200
    assert retried.json() == patched.json()


async def test_create_with_another_clinicians_id_is_a_conflict(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice, title="Alice's")
    before = await row(recording.id)

    response = await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-9"}, user=bob)

    assert response.status_code == 409
    assert response.json()["detail"] == ID_TAKEN
    assert "patient_ref" not in response.json()
    assert await row(recording.id) == before


async def test_create_with_a_deleted_id_is_a_conflict(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)
    before = await row(recording.id)

    response = await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-1"}, user=alice)

    assert response.status_code == 409
    assert response.json()["detail"] == ID_DELETED
    assert await row(recording.id) == before


async def test_create_with_an_id_that_is_not_a_uuid_is_invalid(api, alice):
    response = await api.post("/recordings", {"id": "not-a-uuid", "patient_ref": "PAT-1"}, user=alice)

    assert response.status_code == 422
    assert await Recording.objects.acount() == 0


# patient_ref


async def test_patient_ref_is_trimmed(api, alice):
    cases = {"  PAT-1  ": "PAT-1", "\tPAT-2\n": "PAT-2", "\u00a0PAT 3\u2003": "PAT 3", " " + "x" * 64 + " ": "x" * 64}

    answers = {given: await api.post("/recordings", {"patient_ref": given}, user=alice) for given in cases}

    assert {given: response.status_code for given, response in answers.items()} == dict.fromkeys(cases, 201)
    assert {given: response.json()["patient_ref"] for given, response in answers.items()} == cases
    assert sorted([recording.patient_ref async for recording in Recording.objects.all()]) == sorted(cases.values())


async def test_patient_ref_must_be_1_to_64_characters_after_trimming(api, alice):
    refused = ["", "   ", "\t\n", "x" * 65, " " + "y" * 65 + " "]

    answers = [await api.post("/recordings", {"patient_ref": given}, user=alice) for given in refused]

    assert [response.status_code for response in answers] == [422] * len(refused)
    assert all(PATIENT_REF_LENGTH in error_messages(response) for response in answers)
    assert await Recording.objects.acount() == 0


async def test_patient_ref_refuses_control_characters(api, alice):
    refused = ["PAT\x001", "PAT\n1", "PAT\r1", "PAT\x7f1", "PAT\x851", "PAT\x1b[0m"]

    answers = [await api.post("/recordings", {"patient_ref": given}, user=alice) for given in refused]

    assert [response.status_code for response in answers] == [422] * len(refused)
    assert all(PATIENT_REF_CONTROL in error_messages(response) for response in answers)
    assert await Recording.objects.acount() == 0


def test_the_control_character_pattern_is_exactly_unicodes_cc_category():
    matched = {code for code in range(sys.maxunicode + 1) if CONTROL_CHARACTER.match(chr(code))}

    assert matched == {code for code in range(sys.maxunicode + 1) if unicodedata.category(chr(code)) == "Cc"}


async def test_patient_ref_is_a_required_string(api, alice):
    payloads = [{}, {"patient_ref": None}, {"patient_ref": 12345}, {"patient_ref": ["PAT"]}, {"patient_ref": {}}]

    answers = [(await api.post("/recordings", payload, user=alice)).status_code for payload in payloads]

    assert answers == [422] * len(payloads)
    assert await Recording.objects.acount() == 0


async def test_create_refuses_fields_out_of_their_rules(api, alice):
    payloads = [
        {"title": "t" * 201},
        {"note_type": "n" * 51},
        {"audio_path": "a" * 501},
        {"duration_seconds": -0.5},
        {"verification_results": "not an object"},
        {"verification_results": 3},
        {"verification_results": None},
        {"recorded_at": "yesterday"},
        {"title": None},
    ]

    answers = [
        (await api.post("/recordings", {"patient_ref": "PAT-1", **payload}, user=alice)).status_code
        for payload in payloads
    ]

    assert answers == [422] * len(payloads)
    assert await Recording.objects.acount() == 0


async def test_create_accepts_fields_at_their_limits(api, alice):
    payload = {
        "patient_ref": "p" * 64,
        "title": "t" * 200,
        "note_type": "n" * 50,
        "audio_path": "a" * 500,
        "duration_seconds": 0,
    }

    response = await api.post("/recordings", payload, user=alice)

    assert response.status_code == 201
    assert {key: response.json()[key] for key in payload} == payload


async def test_get_and_list_answer_exactly_what_create_answered(api, alice):
    payload = {
        "patient_ref": "PAT-RT",
        "title": "Tïtle \u2028 with\ttabs",
        "note_type": "consult",
        "status": "uploaded",
        "audio_path": "audio/ü.webm",
        "duration_seconds": 0.1,
        "transcript": "Line one\nLine two \U0001f600",
        "verification_results": {
            "big": 2**64 - 1,
            "small": -(2**63),
            "huge": 1e308,
            "tiny": 5e-324,
            "text": "é\u0001\U0001f600",
            "nested": [[{"none": None, "yes": True, "no": False}]],
            "empty": {},
            "list": [],
        },
        "error": "",
        "recorded_at": "2024-03-01T10:00:00.000001+02:00",
    }

    created = await api.post("/recordings", payload, user=alice)
    fetched = await api.get(f"/recordings/{created.json()['id']}", user=alice)
    listed = await api.get("/recordings", user=alice)

    assert created.status_code == 201
    assert fetched.json() == created.json()
    assert listed.json()["items"] == [created.json()]
    assert fetched.json()["verification_results"] == payload["verification_results"]


async def test_get_answers_what_patch_answered(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    patched = await api.patch(
        f"/recordings/{recording.id}",
        {"version": 1, "recorded_at": "2024-01-01T00:00:00Z", "verification_results": [1, "two", 3.5]},
        user=alice,
    )
    fetched = await api.get(f"/recordings/{recording.id}", user=alice)

    assert patched.status_code == 200
    assert fetched.json() == patched.json()


async def test_get_and_list_answer_timestamps_in_utc_with_an_offset(api, alice, make_recording):
    recording = await make_recording(owner=alice, recorded_at=datetime(2024, 1, 1, 9, 30, tzinfo=UTC))

    fetched = (await api.get(f"/recordings/{recording.id}", user=alice)).json()
    listed = (await api.get("/recordings", user=alice)).json()["items"][0]

    offsets = {
        (source, name): utc(answer[name]).utcoffset()
        for source, answer in (("get", fetched), ("list", listed))
        for name in ("created_at", "updated_at", "recorded_at")
    }
    assert offsets == dict.fromkeys(offsets, timedelta(0))


async def test_timestamps_read_back_the_same_with_and_without_microseconds(api, alice, make_recording):
    whole = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    fraction = datetime(2024, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    first = await make_recording(owner=alice, recorded_at=whole)
    second = await make_recording(owner=alice, recorded_at=fraction)
    await Recording.objects.filter(pk=first.id).aupdate(created_at=fraction, updated_at=whole)
    await Recording.objects.filter(pk=second.id).aupdate(created_at=whole, updated_at=fraction)

    listed = (await api.get("/recordings", user=alice)).json()["items"]

    assert [item["id"] for item in listed] == [str(first.id), str(second.id)]
    assert [utc(item["created_at"]) for item in listed] == [fraction, whole]
    assert [utc(item["updated_at"]) for item in listed] == [whole, fraction]
    assert [utc(item["recorded_at"]) for item in listed] == [whole, fraction]


# List


async def test_list_is_newest_first(api, alice, make_recording):
    oldest = await make_recording(owner=alice, title="oldest")
    newest = await make_recording(owner=alice, title="newest")
    middle = await make_recording(owner=alice, title="middle")
    base = datetime(2024, 1, 1, tzinfo=UTC)
    for offset, recording in enumerate([oldest, middle, newest]):
        await Recording.objects.filter(pk=recording.id).aupdate(created_at=base + timedelta(minutes=offset))

    response = await api.get("/recordings", user=alice)

    assert response.status_code == 200
    assert [item["title"] for item in response.json()["items"]] == ["newest", "middle", "oldest"]
    assert response.json()["count"] == 3


async def test_list_items_are_whole_recordings(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    listed = await api.get("/recordings", user=alice)
    fetched = await api.get(f"/recordings/{recording.id}", user=alice)

    assert listed.json()["items"] == [fetched.json()]


async def test_list_limit_defaults_to_50_and_count_is_the_total(api, alice):
    await make_many(alice, 55)

    response = await api.get("/recordings", user=alice)

    assert response.status_code == 200
    assert len(response.json()["items"]) == 50
    assert response.json()["count"] == 55


async def test_list_limit_and_offset_page_through_everything_once(api, alice):
    recordings = await make_many(alice, 7)

    pages = [(await api.get(f"/recordings?limit=3&offset={offset}", user=alice)).json() for offset in (0, 3, 6, 9)]

    ids = [item["id"] for page in pages for item in page["items"]]
    assert [len(page["items"]) for page in pages] == [3, 3, 1, 0]
    assert sorted(ids) == sorted(str(recording.id) for recording in recordings)
    assert {page["count"] for page in pages} == {7}


async def test_list_accepts_limit_at_its_bounds(api, alice):
    await make_many(alice, 3)

    one = await api.get("/recordings?limit=1", user=alice)
    most = await api.get("/recordings?limit=200", user=alice)

    assert (one.status_code, most.status_code) == (200, 200)
    assert (len(one.json()["items"]), len(most.json()["items"])) == (1, 3)


async def test_list_filters_by_status(api, alice, make_recording):
    await make_recording(owner=alice, status="pending")
    uploaded = [await make_recording(owner=alice, status="uploaded") for _ in range(3)]

    response = await api.get("/recordings?status=uploaded&limit=2", user=alice)

    assert response.status_code == 200
    assert {item["status"] for item in response.json()["items"]} == {"uploaded"}
    assert len(response.json()["items"]) == 2
    assert response.json()["count"] == len(uploaded)


async def test_list_filters_by_patient_ref(api, alice, make_recording):
    await make_recording(owner=alice, patient_ref="PAT-A")
    await make_recording(owner=alice, patient_ref="PAT-B")
    await make_recording(owner=alice, patient_ref="PAT-B", status="uploaded")

    both = await api.get("/recordings?patient_ref=PAT-B", user=alice)
    combined = await api.get("/recordings?patient_ref=PAT-B&status=uploaded", user=alice)

    assert {item["patient_ref"] for item in both.json()["items"]} == {"PAT-B"}
    assert both.json()["count"] == 2
    assert combined.json()["count"] == 1
    assert combined.json()["items"][0]["status"] == "uploaded"


async def test_list_never_shows_other_clinicians_recordings(api, alice, bob, make_recording):
    mine = await make_recording(owner=alice, patient_ref="PAT-1")
    await make_recording(owner=bob, patient_ref="PAT-1")

    response = await api.get("/recordings?patient_ref=PAT-1", user=alice)

    assert [item["id"] for item in response.json()["items"]] == [str(mine.id)]
    assert response.json()["count"] == 1


async def test_list_leaves_out_deleted_recordings(api, alice, make_recording):
    kept = await make_recording(owner=alice)
    gone = await make_recording(owner=alice)
    await api.delete(f"/recordings/{gone.id}", user=alice)

    response = await api.get("/recordings", user=alice)

    assert [item["id"] for item in response.json()["items"]] == [str(kept.id)]
    assert response.json()["count"] == 1


async def test_list_of_a_clinician_without_recordings_is_empty(api, alice, bob, make_recording):
    await make_recording(owner=bob)

    response = await api.get("/recordings", user=alice)

    assert response.status_code == 200
    assert response.json() == {"items": [], "count": 0}


# Get


async def test_get_answers_the_recording(api, alice, make_recording):
    recording = await make_recording(owner=alice, title="Visit", verification_results={"a": [1, 2]})

    response = await api.get(f"/recordings/{recording.id}", user=alice)

    assert response.status_code == 200
    assert response.json()["id"] == str(recording.id)
    assert response.json()["title"] == "Visit"
    assert response.json()["verification_results"] == {"a": [1, 2]}
    assert response.json()["owner"] == "alice"


async def test_get_of_another_clinicians_recording_is_not_found(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.get(f"/recordings/{recording.id}", user=bob)

    assert response.status_code == 404
    assert "patient_ref" not in response.text
    assert "detail" in response.json()


async def test_get_of_a_deleted_recording_is_not_found(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)

    response = await api.get(f"/recordings/{recording.id}", user=alice)

    assert response.status_code == 404


async def test_get_of_an_unknown_id_is_not_found(api, alice):
    response = await api.get(f"/recordings/{uuid.uuid4()}", user=alice)

    assert response.status_code == 404
    assert "detail" in response.json()


async def test_not_found_looks_the_same_for_foreign_and_unknown_ids(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)

    foreign = await api.get(f"/recordings/{recording.id}", user=bob)
    unknown = await api.get(f"/recordings/{uuid.uuid4()}", user=bob)

    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == unknown.json()


# Patch


async def test_patch_changes_only_the_given_fields(api, alice, make_recording):
    recording = await make_recording(owner=alice, title="Old", note_type="consult", transcript="text")
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "New"}, user=alice)

    after = await row(recording.id)
    assert response.status_code == 200
    assert (response.json()["title"], response.json()["version"]) == ("New", 2)
    assert (after["title"], after["version"]) == ("New", 2)
    moved = {"title", "version", "updated_at", "change_seq", "digest"}
    assert {key: value for key, value in after.items() if key not in moved} == {
        key: value for key, value in before.items() if key not in moved
    }


async def test_patch_bumps_version_and_moves_updated_at(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    first = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "a"}, user=alice)
    second = await api.patch(f"/recordings/{recording.id}", {"version": 2, "title": "b"}, user=alice)

    assert [first.json()["version"], second.json()["version"]] == [2, 3]
    assert utc(recording.updated_at.isoformat()) < utc(first.json()["updated_at"]) < utc(second.json()["updated_at"])
    assert first.json()["created_at"] == second.json()["created_at"]
    assert (await stored(recording.id)).version == 3


async def test_patch_trims_patient_ref(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "patient_ref": "  PAT-2 "}, user=alice)

    assert response.status_code == 200
    assert response.json()["patient_ref"] == "PAT-2"


async def test_stale_version_is_a_conflict_with_the_current_recording(api, alice, make_recording):
    recording = await make_recording(owner=alice, title="Old")
    current = (await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Newer"}, user=alice)).json()

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Lost"}, user=alice)

    body = response.json()
    assert response.status_code == 409
    assert body["detail"] == STALE_VERSION
    assert body["version"] == 2
    assert body["current"] == current
    assert {key: body[key] for key in RECORDING_KEYS} == current
    assert (await stored(recording.id)).title == "Newer"


async def test_any_version_but_the_current_is_stale(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)
    versions = [0, 2, -1, 2**31, 2**63 - 1]

    answers = [
        await api.patch(f"/recordings/{recording.id}", {"version": version, "title": "x"}, user=alice)
        for version in versions
    ]

    assert [(response.status_code, response.json()["detail"]) for response in answers] == [(409, STALE_VERSION)] * len(
        versions
    )
    assert await row(recording.id) == before


async def test_patch_without_version_is_invalid(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"title": "x"}, user=alice)

    assert response.status_code == 422
    assert await row(recording.id) == before


async def test_every_allowed_status_transition(api, alice, make_recording):
    recordings = {pair: await set_status(await make_recording(owner=alice), pair[0]) for pair in ALLOWED_PAIRS}

    answers = {
        (old, new): await api.patch(f"/recordings/{recording.id}", {"version": 1, "status": new}, user=alice)
        for (old, new), recording in recordings.items()
    }

    assert {pair: response.status_code for pair, response in answers.items()} == dict.fromkeys(ALLOWED_PAIRS, 200)
    assert {pair: response.json()["status"] for pair, response in answers.items()} == {
        pair: pair[1] for pair in ALLOWED_PAIRS
    }
    assert {pair: response.json()["version"] for pair, response in answers.items()} == dict.fromkeys(ALLOWED_PAIRS, 2)
    assert {pair: (await stored(recording.id)).status for pair, recording in recordings.items()} == {
        pair: pair[1] for pair in ALLOWED_PAIRS
    }


async def test_every_refused_status_transition_is_a_conflict(api, alice, make_recording):
    recordings = {pair: await set_status(await make_recording(owner=alice), pair[0]) for pair in REFUSED_PAIRS}
    before = {pair: await row(recording.id) for pair, recording in recordings.items()}

    answers = {
        (old, new): await api.patch(
            f"/recordings/{recording.id}", {"version": 1, "status": new, "title": "x"}, user=alice
        )
        for (old, new), recording in recordings.items()
    }

    assert {pair: response.status_code for pair, response in answers.items()} == dict.fromkeys(REFUSED_PAIRS, 409)
    assert {pair: response.json()["detail"] for pair, response in answers.items()} == {
        (old, new): transition_refused(old, new) for old, new in REFUSED_PAIRS
    }
    assert {
        pair: (response.json()["status"], response.json()["current"]["status"]) for pair, response in answers.items()
    } == {pair: (pair[0], pair[0]) for pair in REFUSED_PAIRS}
    assert {pair: await row(recording.id) for pair, recording in recordings.items()} == before


async def test_verified_is_final(api, alice, make_recording):
    recording = await set_status(await make_recording(owner=alice), "verified")

    answers = [
        (await api.patch(f"/recordings/{recording.id}", {"version": 1, "status": status}, user=alice)).status_code
        for status in STATUSES
        if status != "verified"
    ]

    assert answers == [409] * 5
    assert (await stored(recording.id)).status == "verified"


async def test_walking_the_whole_happy_path(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    version = recording.version

    for status in ["uploaded", "transcribing", "transcribed", "transcribing", "transcribed", "verified"]:
        response = await api.patch(f"/recordings/{recording.id}", {"version": version, "status": status}, user=alice)
        assert response.status_code == 200, (status, response.json())
        version = response.json()["version"]

    assert version == 7
    assert (await stored(recording.id)).status == "verified"


async def test_patch_refuses_null_on_a_non_nullable_field(api, alice, make_recording):
    fields = [
        "patient_ref",
        "title",
        "note_type",
        "status",
        "audio_path",
        "transcript",
        "verification_results",
        "error",
    ]
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    answers = {
        field: await api.patch(f"/recordings/{recording.id}", {"version": 1, field: None}, user=alice)
        for field in fields
    }

    assert {field: response.status_code for field, response in answers.items()} == dict.fromkeys(fields, 422)
    assert all(NOT_NULL in error_messages(response) for response in answers.values())
    assert await row(recording.id) == before


async def test_patch_clears_the_nullable_fields_with_null(api, alice, make_recording):
    recording = await make_recording(owner=alice, duration_seconds=31.5, recorded_at=datetime(2024, 5, 1, tzinfo=UTC))

    response = await api.patch(
        f"/recordings/{recording.id}", {"version": 1, "duration_seconds": None, "recorded_at": None}, user=alice
    )

    after = await stored(recording.id)
    assert response.status_code == 200
    assert (response.json()["duration_seconds"], response.json()["recorded_at"]) == (None, None)
    assert response.json()["version"] == 2
    assert (after.duration_seconds, after.recorded_at) == (None, None)


async def test_patch_that_changes_nothing_keeps_the_version(api, alice, make_recording):
    recording = await make_recording(
        owner=alice, title="Same", duration_seconds=4.0, verification_results={"a": 1}, status="uploaded"
    )
    before = await row(recording.id)

    response = await api.patch(
        f"/recordings/{recording.id}",
        {
            "version": 1,
            "title": "Same",
            "patient_ref": f"  {recording.patient_ref}  ",
            "duration_seconds": 4,
            "verification_results": {"a": 1},
            "status": "uploaded",
            "recorded_at": None,
        },
        user=alice,
    )

    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert await row(recording.id) == before


async def test_patch_stores_a_json_value_that_only_python_thinks_is_equal(api, alice, make_recording):
    recording = await make_recording(owner=alice, verification_results={"ok": True, "score": 1.0, "items": [0]})
    changed = {"ok": 1, "score": 1, "items": [False]}

    response = await api.patch(
        f"/recordings/{recording.id}", {"version": 1, "verification_results": changed}, user=alice
    )

    fetched = await api.get(f"/recordings/{recording.id}", user=alice)
    assert response.status_code == 200
    # Types and values, not key order: PostgreSQL's jsonb keeps keys in an order of its own.
    assert sorted((key, repr(value)) for key, value in fetched.json()["verification_results"].items()) == sorted(
        (key, repr(value)) for key, value in changed.items()
    )
    assert fetched.json()["version"] == 2


async def test_patch_with_only_the_version_changes_nothing(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1}, user=alice)

    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert await row(recording.id) == before


async def test_patch_refuses_invalid_changes(api, alice, make_recording):
    payloads = [
        {"title": "t" * 201},
        {"patient_ref": "   "},
        {"patient_ref": "PAT\x00"},
        {"duration_seconds": -1},
        {"status": "bogus"},
        {"verification_results": "text"},
        {"owner": "bob"},
        {"id": "00000000-0000-0000-0000-000000000000"},
        {"created_at": "2024-01-01T00:00:00Z"},
        {"version": "one"},
    ]
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    answers = [
        (await api.patch(f"/recordings/{recording.id}", {"version": 1, **payload}, user=alice)).status_code
        for payload in payloads
    ]

    assert answers == [422] * len(payloads)
    assert await row(recording.id) == before


async def test_patch_of_another_clinicians_recording_is_not_found(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 1, "title": "Bob's now"}, user=bob)

    assert response.status_code == 404
    assert "current" not in response.json()
    assert await row(recording.id) == before


async def test_patch_of_a_deleted_recording_is_not_found(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)
    before = await row(recording.id)

    response = await api.patch(f"/recordings/{recording.id}", {"version": 2, "title": "x"}, user=alice)

    assert response.status_code == 404
    assert await row(recording.id) == before


async def test_patch_of_an_unknown_id_is_not_found(api, alice):
    response = await api.patch(f"/recordings/{uuid.uuid4()}", {"version": 1, "title": "x"}, user=alice)

    assert response.status_code == 404


async def test_two_patches_from_the_same_version_cannot_both_win(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    path = f"/recordings/{recording.id}"

    first, second = await asyncio.gather(
        api.patch(path, {"version": 1, "title": "first"}, user=alice),
        api.patch(path, {"version": 1, "title": "second"}, user=alice),
    )

    winner = first if first.status_code == 200 else second
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    assert (await stored(recording.id)).title == winner.json()["title"]
    assert (await stored(recording.id)).version == 2


async def test_the_same_upload_sent_twice_at_once_creates_one_recording(api, alice):
    payload = {"id": str(uuid.uuid4()), "patient_ref": "PAT-1"}

    answers = await asyncio.gather(*[api.post("/recordings", payload, user=alice) for _ in range(3)])

    assert sorted(response.status_code for response in answers) == [200, 200, 201]
    assert len({response.json()["created_at"] for response in answers}) == 1
    assert await Recording.objects.acount() == 1


# Delete


async def test_delete_answers_204_and_hides_the_recording(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    response = await api.delete(f"/recordings/{recording.id}", user=alice)

    assert response.status_code == 204
    assert response.content == b""
    assert (await api.get(f"/recordings/{recording.id}", user=alice)).status_code == 404


async def test_delete_keeps_a_tombstone(api, alice, make_recording):
    recording = await make_recording(owner=alice)

    await api.delete(f"/recordings/{recording.id}", user=alice)

    tombstone = await stored(recording.id)
    assert tombstone.deleted_at is not None
    assert tombstone.version == recording.version + 1
    assert tombstone.change_seq > recording.change_seq


async def test_delete_twice_answers_204_and_changes_nothing_more(api, alice, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)
    before = await row(recording.id)

    response = await api.delete(f"/recordings/{recording.id}", user=alice)

    assert response.status_code == 204
    assert await row(recording.id) == before


async def test_delete_of_a_never_seen_id_is_not_found(api, alice):
    response = await api.delete(f"/recordings/{uuid.uuid4()}", user=alice)

    assert response.status_code == 404
    assert "detail" in response.json()


async def test_delete_of_another_clinicians_recording_is_not_found_and_leaves_it(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    before = await row(recording.id)

    response = await api.delete(f"/recordings/{recording.id}", user=bob)

    assert response.status_code == 404
    assert await row(recording.id) == before
    assert (await api.get(f"/recordings/{recording.id}", user=alice)).status_code == 200


async def test_delete_of_another_clinicians_deleted_recording_is_not_found(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    await api.delete(f"/recordings/{recording.id}", user=alice)

    response = await api.delete(f"/recordings/{recording.id}", user=bob)

    assert response.status_code == 404


# The change sequence


async def test_change_seq_strictly_increases_across_create_update_and_delete(api, alice, bob):
    seen = []

    first = (await api.post("/recordings", {"patient_ref": "PAT-1"}, user=alice)).json()["id"]
    seen.append((await stored(first)).change_seq)
    second = (await api.post("/recordings", {"patient_ref": "PAT-2"}, user=bob)).json()["id"]
    seen.append((await stored(second)).change_seq)
    await api.patch(f"/recordings/{first}", {"version": 1, "title": "x"}, user=alice)
    seen.append((await stored(first)).change_seq)
    await api.patch(f"/recordings/{second}", {"version": 1, "status": "uploaded"}, user=bob)
    seen.append((await stored(second)).change_seq)
    await api.delete(f"/recordings/{first}", user=alice)
    seen.append((await stored(first)).change_seq)

    assert seen == sorted(set(seen))
    assert await sequence_value() == seen[-1]


async def test_refused_writes_take_no_change_number(api, alice, bob, make_recording):
    recording = await make_recording(owner=alice)
    before = await sequence_value()

    await api.patch(f"/recordings/{recording.id}", {"version": 9, "title": "x"}, user=alice)
    await api.patch(f"/recordings/{recording.id}", {"version": 1, "status": "verified"}, user=alice)
    await api.patch(f"/recordings/{recording.id}", {"version": 1}, user=alice)
    await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-1"}, user=alice)
    await api.post("/recordings", {"id": str(recording.id), "patient_ref": "PAT-1"}, user=bob)
    await api.delete(f"/recordings/{recording.id}", user=bob)

    assert await sequence_value() == before
    assert (await stored(recording.id)).change_seq == before


async def test_an_empty_note_type_is_kept_as_given(api, alice):
    # The contract sets only a maximum; an empty note type once answered 500.
    created = await api.post("/recordings", {"patient_ref": "PAT-1", "note_type": ""}, user=alice)
    patched = await api.patch(f"/recordings/{created.json()['id']}", {"version": 1, "note_type": ""}, user=alice)
    other = await api.post("/recordings", {"patient_ref": "PAT-2"}, user=alice)
    emptied = await api.patch(f"/recordings/{other.json()['id']}", {"version": 1, "note_type": ""}, user=alice)

    assert (created.status_code, created.json()["note_type"]) == (201, "")
    assert (patched.status_code, patched.json()["version"]) == (200, 1)
    assert (emptied.status_code, emptied.json()["note_type"], emptied.json()["version"]) == (200, "", 2)
