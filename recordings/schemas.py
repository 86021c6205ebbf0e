"""What the API accepts and returns for recordings."""

import re
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from ninja import Field, Schema
from ninja.errors import ValidationError
from pydantic import BaseModel, ConfigDict, field_validator

from recordings.models import HAS_NUL, MAX_TRANSCRIPT, NUL, results_problem

MAX_OFFSET = 1_000_000_000
MAX_CURSOR = 2**63 - 1

# Unicode's control characters (category Cc), all of them.
CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PATIENT_REF_CONTROL = "patient_ref must not contain control characters"
PATIENT_REF_LENGTH = "patient_ref must be 1 to 64 characters after trimming white space"
NOT_NULL = "may be omitted, but not null"
BAD_DATETIME = "is not a datetime that can be stored in UTC"
VERSION_OR_IF_MATCH = "version is required unless an If-Match header gives the ETag you last saw"

StatusName = Literal["pending", "uploaded", "transcribing", "transcribed", "verified", "failed"]
Results = dict[str, Any] | list[Any]


def clean_patient_ref(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    value = value.strip()
    if not 1 <= len(value) <= 64:
        raise ValueError(PATIENT_REF_LENGTH)
    if CONTROL_CHARACTER.search(value):
        raise ValueError(PATIENT_REF_CONTROL)
    return value


def no_nul(value: Any) -> Any:
    if isinstance(value, str) and NUL in value:
        raise ValueError(HAS_NUL)
    return value


def check_results(value: Any) -> Any:
    problem = results_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # a clock without a zone is taken as UTC
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(BAD_DATETIME) from None


class RecordingFields(BaseModel):
    # Plain pydantic: ninja's Schema validates an extra="forbid" model twice.
    model_config = ConfigDict(extra="forbid")

    _patient_ref = field_validator("patient_ref", mode="before", check_fields=False)(clean_patient_ref)
    _text = field_validator("title", "note_type", "audio_path", "transcript", "error", check_fields=False)(no_nul)
    _results = field_validator("verification_results", check_fields=False)(check_results)
    _recorded_at = field_validator("recorded_at", check_fields=False)(as_utc)


class RecordingIn(RecordingFields):
    id: UUID | None = None
    patient_ref: str
    title: str = Field("", max_length=200)
    note_type: str = Field("general", max_length=50)
    status: Literal["pending", "uploaded"] = "pending"
    audio_path: str = Field("", max_length=500)
    duration_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    transcript: str = Field("", max_length=MAX_TRANSCRIPT)
    verification_results: Results = Field(default_factory=dict)
    error: str = ""
    recorded_at: datetime | None = None


class RecordingPatch(RecordingFields):
    version: int = None  # or If-Match (check_precondition)
    patient_ref: str = None
    title: str = Field(None, max_length=200)
    note_type: str = Field(None, max_length=50)
    status: StatusName = None
    audio_path: str = Field(None, max_length=500)
    duration_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    transcript: str = Field(None, max_length=MAX_TRANSCRIPT)
    verification_results: Results = None
    error: str = None
    recorded_at: datetime | None = None

    @field_validator(
        "version",
        "patient_ref",
        "title",
        "note_type",
        "status",
        "audio_path",
        "transcript",
        "verification_results",
        "error",
        mode="before",
    )
    @classmethod
    def not_null(cls, value: Any) -> Any:
        # Absent means unchanged; null on a field that cannot be empty is an error.
        if value is None:
            raise ValueError(NOT_NULL)
        return value


def check_precondition(patch: RecordingPatch, if_match: str | None) -> None:
    """A patch names the state it changes: `version`, If-Match or both; with neither, 422."""
    if "version" not in patch.model_fields_set and if_match is None:
        raise ValidationError([{"loc": ("body", "data", "version"), "msg": VERSION_OR_IF_MATCH, "type": "missing"}])


class RecordingOut(BaseModel):
    """A plain pydantic model, validated in Rust: ninja's Schema wraps every
    object in a Python getter first, which costs more than the query on a list."""

    model_config = ConfigDict(from_attributes=True)

    id: UUID
    patient_ref: str
    title: str
    note_type: str
    status: StatusName
    audio_path: str
    duration_seconds: float | None
    transcript: str
    verification_results: Results
    error: str
    recorded_at: datetime | None
    owner: str
    created_at: datetime
    updated_at: datetime
    version: int
    digest: str = Field(description="SHA-256 of the id, content and version (README: Verifiable records)")

    @field_validator("owner", mode="before")
    @classmethod
    def owner_username(cls, value: Any) -> Any:
        return getattr(value, "username", value)


# What the API answers for a recording, in this order; recording_data() builds it.
OUT_FIELDS = tuple(RecordingOut.model_fields)


def recording_data(recording) -> dict:
    """A Recording as the API returns it (RecordingOut's fields), ready for orjson."""
    data = {name: getattr(recording, name) for name in OUT_FIELDS if name != "owner"}
    data["owner"] = recording.owner.username
    return data


class RecordingRefused(RecordingOut):
    """A 409 or 412: why, and the recording as it is now, at the top level and under `current`."""

    detail: str
    current: RecordingOut


class RecordingList(BaseModel):
    items: list[RecordingOut]
    count: int


class RecordingChange(RecordingOut):
    deleted: Literal[False]
    change_seq: int


class Tombstone(BaseModel):
    id: UUID
    deleted: Literal[True]
    owner: str
    version: int
    change_seq: int
    updated_at: datetime
    deleted_at: datetime
    digest: str


class ChangesOut(BaseModel):
    changes: list[RecordingChange | Tombstone]
    cursor: int
    has_more: bool


class ChangesQuery(Schema):
    since: int = Field(0, ge=0, le=MAX_CURSOR)
    limit: int = Field(100, ge=1, le=500)


class RecordingFilters(Schema):
    status: StatusName | None = None
    patient_ref: str | None = Field(None, max_length=64)

    _patient_ref = field_validator("patient_ref")(no_nul)
    limit: int = Field(50, ge=1, le=200)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
