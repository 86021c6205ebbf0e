"""Recording digests: the documented canonical form, written with every change, and verifydb."""

import hashlib
import json
import uuid

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from recordings.services import recording_create, recording_delete, recording_update

pytestmark = pytest.mark.django_db(transaction=True)


def canonical_digest(answer: dict) -> str:
    """The README's canonical form, written out independently of recordings.digests."""

    def number(value):
        return int(value) if isinstance(value, float) and value.is_integer() else value

    def numbers(value):
        if isinstance(value, dict):
            return {key: numbers(item) for key, item in value.items()}
        if isinstance(value, list):
            return [numbers(item) for item in value]
        return number(value)

    recorded = answer["recorded_at"]
    if recorded is not None:
        recorded = recorded.replace("+00:00", "")
        recorded = (recorded if "." in recorded else recorded + ".000000") + "Z"
    values = [
        answer["id"],
        answer["patient_ref"],
        answer["title"],
        answer["note_type"],
        answer["status"],
        answer["audio_path"],
        number(answer["duration_seconds"]),
        answer["transcript"],
        numbers(answer["verification_results"]),
        answer["error"],
        recorded,
        answer["version"],
    ]
    text = json.dumps(values, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


BODY = {
    "patient_ref": "PAT-1",
    "title": "Visite à domicile ✓",
    "transcript": 'Line one\nquote " and tab\t',
    "duration_seconds": 12.0,
    "verification_results": {"z": [1, 2.5, {"b": True, "a": None}], "a": "x"},
    "recorded_at": "2024-05-01T10:00:00.250000Z",
}


async def test_every_answer_carries_the_digest_of_its_documented_canonical_form(api, alice):
    created = (await api.post("/recordings", BODY, user=alice)).json()
    patched = await api.patch(f"/recordings/{created['id']}", {"version": 1, "status": "uploaded"}, user=alice)
    listed = (await api.get("/recordings", user=alice)).json()["items"][0]

    assert created["digest"] == canonical_digest(created)
    assert patched.json()["digest"] == canonical_digest(patched.json()) != created["digest"]
    assert listed["digest"] == patched.json()["digest"]


async def test_a_digest_differs_when_any_content_field_or_the_version_does(api, alice):
    one = (await api.post("/recordings", BODY, user=alice)).json()
    other = (await api.post("/recordings", {**BODY, "transcript": BODY["transcript"] + " "}, user=alice)).json()

    assert one["digest"] != other["digest"]
    assert {**one, "id": other["id"], "digest": None} != {**other, "digest": None}


def _tamper(statement: str, params):
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def _db_id(recording) -> str:
    return recording.pk.hex if connection.vendor == "sqlite" else str(recording.pk)


def test_verifydb_passes_an_untouched_database(alice, capsys):
    recording, _ = recording_create(owner=alice, patient_ref="PAT-1", transcript="Fine.")
    recording_update(owner=alice, recording_id=recording.pk, version=1, status="uploaded")
    gone, _ = recording_create(owner=alice, patient_ref="PAT-2")
    recording_delete(owner=alice, recording_id=gone.pk)

    call_command("verifydb")

    assert "All 2 recordings match their digests." in capsys.readouterr().out


@pytest.mark.parametrize(
    ("column", "value"),
    [("transcript", "Edited behind the application's back."), ("version", 7), ("patient_ref", "PAT-999")],
)
def test_verifydb_names_a_recording_edited_in_the_database(alice, capsys, column, value):
    kept, _ = recording_create(owner=alice, patient_ref="PAT-1", transcript="Original.")
    edited, _ = recording_create(owner=alice, patient_ref="PAT-2", transcript="Original.")
    _tamper(f"UPDATE recordings_recording SET {column} = %s WHERE id = %s", [value, _db_id(edited)])

    with pytest.raises(CommandError, match="1 of 2 recordings do not match"):
        call_command("verifydb")

    out = capsys.readouterr().out
    assert str(edited.pk) in out
    assert str(kept.pk) not in out


def test_the_digest_survives_the_engines_json_round_trip(alice, capsys):
    results = {"big": 1e308, "tiny": 1.5e-7, "whole": 100.0, "int": 2**63 - 1, "neg": -0.5, "nested": {"b": 1, "a": 2}}
    recording_create(owner=alice, patient_ref="PAT-1", verification_results=results, duration_seconds=5)

    call_command("verifydb")

    assert "All 1 recordings match" in capsys.readouterr().out


def test_ids_are_listed_in_their_api_form(alice, capsys):
    recording, _ = recording_create(owner=alice, patient_ref="PAT-1")
    _tamper("UPDATE recordings_recording SET title = %s WHERE id = %s", ["x", _db_id(recording)])

    with pytest.raises(CommandError):
        call_command("verifydb")

    assert str(uuid.UUID(str(recording.pk))) in capsys.readouterr().out.split()
