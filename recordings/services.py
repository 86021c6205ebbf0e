"""Writes to recordings: each one transaction that also takes the next change number."""

import uuid
from functools import cache

import orjson
from django.db import connection, transaction
from django.utils import timezone

from clinical import sql
from clinical.audit import Action, audit_reads, audit_record
from clinical.changes import NEXT_SQL, next_change_seq
from clinical.conditional import if_match_passes
from clinical.idempotency import idempotency_keys_drop
from clinical.locks import serialise
from recordings.digests import recording_digest
from recordings.models import INITIAL_STATUSES, TOMBSTONE_CLEARED, TRANSITIONS, Recording

STALE_VERSION = "Stale version: the recording was changed since you read it."
ID_TAKEN = "This id belongs to another recording."
ID_DELETED = "A recording with this id was deleted; it cannot be created again."
PRECONDITION_FAILED = "If-Match does not match: the recording was changed since you read it."


class RecordingConflict(Exception):
    """A write refused because of the recording's current state (409)."""

    def __init__(self, detail: str, recording: Recording | None = None):
        super().__init__(detail)
        self.detail = detail
        self.recording = recording


class PreconditionFailed(RecordingConflict):
    """A write refused because If-Match does not name the recording's current state (412)."""


def transition_refused(old: str, new: str) -> str:
    return f"Status transition {old} -> {new} is not allowed."


@transaction.atomic
def recording_create(
    *, owner, actor=None, ip: str | None = None, validated: bool = False, id: uuid.UUID | None = None, **fields
) -> tuple[Recording, bool]:
    """Create a recording; (recording, created). A retried create returns the stored one (audited as a read).

    `actor` is who does it (the owner unless given), `ip` where from: both for the audit trail.
    `validated`: the fields passed the API's schema, which refuses whatever the
    model would (tests/test_schema_model.py), so the model's validation is not
    run a second time.
    """
    actor = actor or owner
    if id is not None:
        # Two uploads of one id at once (two app servers on PostgreSQL): the
        # second waits for the first to commit, then finds its recording.
        serialise(f"recording:{id}")
        existing = Recording.objects.select_related("owner").filter(pk=id).first()
        if existing is not None:
            if existing.owner_id != owner.pk:
                raise RecordingConflict(ID_TAKEN)
            if existing.deleted_at is not None:
                raise RecordingConflict(ID_DELETED)
            audit_reads(actor=actor, recording_ids=[existing.pk], ip=ip)
            return existing, False
    if fields.get("status", INITIAL_STATUSES[0]) not in INITIAL_STATUSES:
        raise RecordingConflict(f"A new recording starts as {' or '.join(INITIAL_STATUSES)}.")
    now = timezone.now()
    recording = Recording(id=id or uuid.uuid4(), owner=owner, created_at=now, updated_at=now, version=1, **fields)
    if not validated:
        _validate(recording)
    # Audited first: the change number's lock is held from when it is taken to commit.
    audit_record(
        actor=actor,
        action=Action.CREATE,
        recording_id=recording.pk,
        fields=fields,
        status=("", recording.status),
        ip=ip,
    )
    _insert_numbered(recording)
    return recording, True


@transaction.atomic
def recording_update(
    *,
    owner,
    recording_id: uuid.UUID,
    version: int | None = None,
    if_match: str | None = None,
    actor=None,
    ip: str | None = None,
    validated: bool = False,
    **changes,
) -> Recording:
    """Apply changes if `if_match` (an If-Match header) and `version` are current and the status transition is allowed.

    The API asks for one of `version` and `if_match` at least; each is checked when given.
    `validated` as for recording_create: every field checked by the API's schema.
    """
    actor = actor or owner
    # Read inside the write transaction: the checks must see the latest row.
    recording = _get_live_for_update(owner, recording_id)
    _check_if_match(recording, if_match)
    if version is not None and recording.version != version:
        raise RecordingConflict(STALE_VERSION, recording)
    new_status = changes.get("status", recording.status)
    if new_status != recording.status and new_status not in TRANSITIONS[recording.status]:
        raise RecordingConflict(transition_refused(recording.status, new_status), recording)
    changed = {field: value for field, value in changes.items() if not _same(getattr(recording, field), value)}
    if not changed:
        audit_reads(actor=actor, recording_ids=[recording.pk], ip=ip)  # nothing changed; the answer is a read
        return recording
    old_status = recording.status
    for field, value in changed.items():
        setattr(recording, field, value)
    if not validated:
        _validate(recording)
    status = (old_status, recording.status) if "status" in changed else None
    audit_record(actor=actor, action=Action.UPDATE, recording_id=recording.pk, fields=changed, status=status, ip=ip)
    recording.version += 1
    recording.updated_at = timezone.now()
    recording.digest = recording_digest(recording)
    recording.change_seq = next_change_seq()  # last: its lock is held to commit
    recording.save(update_fields=[*changed, "version", "updated_at", "digest", "change_seq"])
    return recording


@transaction.atomic
def recording_delete(
    *, owner, recording_id: uuid.UUID, if_match: str | None = None, actor=None, ip: str | None = None
) -> Recording:
    """Mark a recording deleted, keeping a tombstone for the sync feed; deleting twice is fine.

    `if_match` (an If-Match header) is checked against a live recording only:
    deleting a deleted one is done already, whatever the client last saw.
    The tombstone keeps no clinical content, and the stored answers that
    carried the recording go with it: nothing serves a deleted note again.
    """
    actor = actor or owner
    # The owner with it: a 412 answers with the recording, off the database thread.
    locked = Recording.objects.select_related("owner").select_for_update(of=("self",))
    recording = locked.filter(pk=recording_id, owner=owner).first()
    if recording is None:
        raise Recording.DoesNotExist
    if recording.deleted_at is not None:
        return recording
    _check_if_match(recording, if_match)
    now = timezone.now()
    for field, value in TOMBSTONE_CLEARED.items():
        setattr(recording, field, value)
    recording.deleted_at = now
    recording.updated_at = now
    recording.version += 1
    idempotency_keys_drop(recording_id=recording.pk)
    audit_record(actor=actor, action=Action.DELETE, recording_id=recording.pk, ip=ip)
    recording.digest = recording_digest(recording)
    recording.change_seq = next_change_seq()  # last: its lock is held to commit
    recording.save(update_fields=[*TOMBSTONE_CLEARED, "deleted_at", "updated_at", "version", "digest", "change_seq"])
    return recording


def insert_recordings(recordings: list[Recording]) -> None:
    """INSERT validated recordings with one statement prepared once.

    What Model.save() and bulk_create() do, without compiling the statement
    again for every row (bulk_create compiles one for each 58 rows on SQLite).
    """
    db, fields = sql.db(), _fields()
    for recording in recordings:
        recording.digest = recording_digest(recording)
    rows = [[field.get_db_prep_save(getattr(row, field.attname), db) for field in fields] for row in recordings]
    sql.executemany(db, _insert_sql(), rows)


def _insert_numbered(recording: Recording) -> None:
    """INSERT a new recording with the next change number, set on it as well.

    On PostgreSQL the number is taken by the statement that writes the row, so
    the sequence row's lock, which every writer waits for, is held for that
    statement and the commit alone. SQLite's write lock is the transaction's.
    """
    db = sql.db()
    if db.vendor != "postgresql":
        recording.change_seq = next_change_seq()
        insert_recordings([recording])
        return
    recording.digest = recording_digest(recording)
    values = [field.get_db_prep_save(getattr(recording, field.attname), db) for field in _unnumbered_fields()]
    (recording.change_seq,) = sql.execute(db, _numbered_insert_sql(), values).fetchone()


@cache
def _insert_sql() -> str:
    fields = _fields()
    placeholders = ", ".join(["%s"] * len(fields))
    return f"INSERT INTO {Recording._meta.db_table} ({_columns()}) VALUES ({placeholders})"  # noqa: S608


@cache
def _numbered_insert_sql() -> str:
    values = ", ".join("next.value" if field.attname == "change_seq" else "%s" for field in _fields())
    return (
        f"WITH next AS ({NEXT_SQL}) "  # noqa: S608 (names only)
        f"INSERT INTO {Recording._meta.db_table} ({_columns()}) SELECT {values} FROM next RETURNING change_seq"
    )


def _fields() -> list:
    return Recording._meta.concrete_fields


def _unnumbered_fields() -> list:
    return [field for field in _fields() if field.attname != "change_seq"]


def _columns() -> str:
    return ", ".join(connection.ops.quote_name(field.column) for field in _fields())


def _same(old, new) -> bool:
    # Python's == says {"ok": True} == {"ok": 1}; JSON does not.
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return orjson.dumps(old, option=orjson.OPT_SORT_KEYS) == orjson.dumps(new, option=orjson.OPT_SORT_KEYS)
    return old == new


def _validate(recording: Recording) -> None:
    # The owner is known to exist and the change number is taken after: skip their queries.
    recording.full_clean(exclude=["owner", "change_seq"], validate_unique=False, validate_constraints=False)


def _check_if_match(recording: Recording, if_match: str | None) -> None:
    # On the row as locked: two writes with the same If-Match cannot both pass.
    if not if_match_passes(if_match, recording.digest):
        raise PreconditionFailed(PRECONDITION_FAILED, recording)


def _get_live_for_update(owner, recording_id: uuid.UUID) -> Recording:
    # Locked until the transaction ends (PostgreSQL; SQLite's IMMEDIATE transaction
    # holds the write lock already): two patches of one version cannot both win.
    live = Recording.objects.select_related("owner").select_for_update(of=("self",))
    return live.get(pk=recording_id, owner=owner, deleted_at__isnull=True)
