"""A clinician's recording: its metadata, transcript and sync bookkeeping."""

import math
import uuid

import orjson
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxLengthValidator, MinValueValidator
from django.db import models
from django.utils import timezone


class Status(models.TextChoices):
    PENDING = "pending"
    UPLOADED = "uploaded"
    TRANSCRIBING = "transcribing"
    TRANSCRIBED = "transcribed"
    VERIFIED = "verified"
    FAILED = "failed"


TRANSITIONS = {
    Status.PENDING: {Status.UPLOADED, Status.FAILED},
    Status.UPLOADED: {Status.TRANSCRIBING, Status.FAILED},
    Status.TRANSCRIBING: {Status.TRANSCRIBED, Status.FAILED},
    Status.TRANSCRIBED: {Status.VERIFIED, Status.TRANSCRIBING, Status.FAILED},
    Status.FAILED: {Status.PENDING},
    Status.VERIFIED: set(),
}
INITIAL_STATUSES = (Status.PENDING, Status.UPLOADED)
QUEUE_STATUSES = (Status.PENDING, Status.UPLOADED, Status.TRANSCRIBING)

MAX_TRANSCRIPT = 500_000
MAX_RESULTS_BYTES = 256 * 1024
MAX_RESULTS_DEPTH = 32
# What a deleted recording keeps of its content: nothing (its tombstone serves the sync feed).
TOMBSTONE_CLEARED = {
    "patient_ref": "",
    "title": "",
    "note_type": "",
    "audio_path": "",
    "duration_seconds": None,
    "transcript": "",
    "verification_results": {},
    "error": "",
    "recorded_at": None,
}

RESULTS_TOO_LARGE = f"verification_results must serialize to at most {MAX_RESULTS_BYTES // 1024} KiB"
RESULTS_NOT_JSON = "verification_results must be JSON: finite numbers, integers of at most 64 bits"
RESULTS_TOO_DEEP = f"verification_results must not nest deeper than {MAX_RESULTS_DEPTH} levels"
# PostgreSQL cannot store U+0000 in text or JSON: refused on both engines alike.
NUL = "\x00"
HAS_NUL = "must not contain the NUL character (U+0000)"
RESULTS_NUL = f"verification_results {HAS_NUL}"


def results_problem(value) -> str | None:
    """Why a verification_results value could not be stored and served back as JSON, or None.

    The API's schema and the model (the admin, the services) both ask: JSON
    the API cannot write back out (nested too deep, too large, NaN, an integer
    past 64 bits) must not get in by any door.
    """
    depth, level = 0, [value]
    while level:
        depth += 1
        if depth > MAX_RESULTS_DEPTH:
            return RESULTS_TOO_DEEP
        children = []
        for item in level:
            if isinstance(item, dict):
                if any(NUL in key for key in item):
                    return RESULTS_NUL
                children.extend(item.values())
            elif isinstance(item, list):
                children.extend(item)
        if any(isinstance(item, float) and not math.isfinite(item) for item in children):
            return RESULTS_NOT_JSON
        if any(isinstance(item, str) and NUL in item for item in children):
            return RESULTS_NUL
        level = [item for item in children if isinstance(item, (dict, list))]
    try:
        size = len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return RESULTS_NOT_JSON
    return RESULTS_TOO_LARGE if size > MAX_RESULTS_BYTES else None


def validate_results(value) -> None:
    problem = results_problem(value)
    if problem:
        raise ValidationError(problem)


class Recording(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="recordings")
    patient_ref = models.CharField(max_length=64)
    title = models.CharField(max_length=200, blank=True, default="")
    note_type = models.CharField(max_length=50, blank=True, default="general")
    status = models.CharField(max_length=20, choices=Status, default=Status.PENDING)
    audio_path = models.CharField(max_length=500, blank=True, default="")
    duration_seconds = models.FloatField(null=True, blank=True, validators=[MinValueValidator(0)])
    transcript = models.TextField(blank=True, default="", validators=[MaxLengthValidator(MAX_TRANSCRIPT)])
    verification_results = models.JSONField(default=dict, blank=True, validators=[validate_results])
    error = models.TextField(blank=True, default="")
    recorded_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(default=timezone.now, editable=False)
    version = models.PositiveIntegerField(default=1, editable=False)
    # Taken from clinical.changes in the transaction of every write: the sync cursor.
    change_seq = models.BigIntegerField(unique=True, editable=False)
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)
    # SHA-256 of the id, content and version (recordings.digests), written with every change.
    digest = models.CharField(max_length=64, editable=False, default="")

    class Meta:
        indexes = [
            # The list (newest first), its filters and its count. deleted_at is an
            # equality column (IS NULL), so that SQLite's planner, without
            # statistics, still picks these over the feed index and never reads
            # the table rows to count.
            models.Index(fields=["owner", "deleted_at", "-created_at", "-id"], name="rec_owner_created"),
            models.Index(fields=["owner", "deleted_at", "status", "-created_at", "-id"], name="rec_owner_status"),
            models.Index(fields=["owner", "deleted_at", "patient_ref", "-created_at", "-id"], name="rec_owner_patient"),
            # The sync feed walks one owner's changes in order, tombstones included.
            models.Index(fields=["owner", "change_seq"], name="rec_owner_change"),
            models.Index(fields=["status"], name="rec_status"),
        ]

    def __str__(self) -> str:
        # No patient text: Django copies this into its admin log and messages.
        return f"Recording {self.pk}"
