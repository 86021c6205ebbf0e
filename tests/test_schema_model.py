"""The API's input schemas refuse whatever the model refuses.

The services trust input that passed RecordingIn or RecordingPatch and skip
the model's full_clean(); these tests hold the two together, at the edges of
every limit and on random values.
"""

import uuid
from datetime import UTC, datetime

import pytest
from django.core.exceptions import ValidationError as ModelInvalid
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError as SchemaInvalid

from recordings.models import MAX_TRANSCRIPT, Recording, Status
from recordings.schemas import RecordingIn, RecordingPatch

NOW = datetime(2024, 5, 1, 10, tzinfo=UTC)
EDGES = {
    "patient_ref": ["", " ", "x", " x ", "x" * 64, "x" * 65, "a\x00b", "\u00e9" * 64],
    "title": ["", "x" * 200, "x" * 201],
    "note_type": ["", "general", "x" * 50, "x" * 51],
    "status": [*Status.values, "bogus", "", "PENDING"],
    "audio_path": ["", "x" * 500, "x" * 501],
    "duration_seconds": [None, -1, -0.0, 0, 1.5, 1e308, "1.5", True],
    "transcript": ["", "x" * MAX_TRANSCRIPT, "x" * (MAX_TRANSCRIPT + 1)],
    "verification_results": [
        *([{}, [], {"a": [1, {"b": None}]}, "text", 3, None]),
        *([[2**64], {"n": -(2**63) - 1}, [float("nan")], {"x": [float("-inf")]}]),
    ],
    "error": ["", "x" * 5000, None],
    "recorded_at": [None, "2024-05-01T10:00:00Z", "2024-05-01T10:00:00", "not a time"],
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def model_accepts(fields: dict) -> bool:
    recording = Recording(id=uuid.uuid4(), owner_id=1, created_at=NOW, updated_at=NOW, version=1, **fields)
    try:
        recording.full_clean(exclude=["owner", "change_seq"], validate_unique=False, validate_constraints=False)
    except ModelInvalid:
        return False
    return True


def created(field: str, value) -> dict | None:
    """The fields RecordingIn hands the service for this one value, or None if it refuses it."""
    body = {"patient_ref": "PAT-1", field: value}
    try:
        fields = dict(RecordingIn.model_validate(body))  # as recordings/api.py hands them over
    except SchemaInvalid:
        return None
    fields.pop("id")
    return fields


def patched(field: str, value) -> dict | None:
    """A recording's fields after RecordingPatch applied this one value, or None if it refuses it."""
    try:
        patch = RecordingPatch.model_validate({"version": 1, field: value})
        changes = {name: getattr(patch, name) for name in patch.model_fields_set}  # as recordings/api.py does
    except SchemaInvalid:
        return None
    changes.pop("version")
    base = created("title", "")
    return {**base, **changes}


def assert_schema_no_looser(field: str, value) -> None:
    for fields in (created(field, value), patched(field, value)):
        if fields is not None:
            assert model_accepts(fields), (field, value)


@pytest.mark.parametrize(("field", "value"), [(field, value) for field, values in EDGES.items() for value in values])
def test_what_the_schemas_accept_at_the_edges_the_model_accepts(field, value):
    assert_schema_no_looser(field, value)


def test_the_edges_are_edges_the_schemas_refuse_past_them():
    refused = [
        ("patient_ref", "x" * 65),
        ("title", "x" * 201),
        ("note_type", "x" * 51),
        ("status", "bogus"),
        ("audio_path", "x" * 501),
        ("duration_seconds", -1),
        ("transcript", "x" * (MAX_TRANSCRIPT + 1)),
    ]

    assert [(field, created(field, value), patched(field, value)) for field, value in refused] == [
        (field, None, None) for field, _ in refused
    ]


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(EDGES)), value=JSON_VALUES)
def test_what_the_schemas_accept_of_any_json_the_model_accepts(field, value):
    assert_schema_no_looser(field, value)


def nested(levels: int):
    value = 1
    for _ in range(levels):
        value = [value]
    return {"n": value}


@pytest.mark.parametrize(
    "results",
    [{"big": 2**70}, [float("nan")], {"deep": [1.5, {"x": float("inf")}]}, nested(40)],
    ids=["integer-past-64-bits", "nan", "infinity", "too-deep"],
)
def test_the_model_refuses_json_the_api_could_not_write_back(results):
    # The admin and the services' other callers go through full_clean(): such a
    # value would otherwise be stored and make every later answer about it fail.
    assert not model_accepts({**created("title", ""), "verification_results": results})
    assert created("verification_results", results) is None
