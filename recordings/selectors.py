"""Reads of recordings, async; a clinician only ever sees their own.

The hot reads are SQL written out once, returning rows as dicts shaped like
RecordingOut: building and compiling a queryset, then a model instance per
row, costs several times more than SQLite takes to answer. Each selector is
one hop to the database thread.
"""

import uuid
from datetime import UTC, datetime
from functools import wraps

import orjson
from django.conf import settings
from django.db import connection, transaction

from clinical.audit import audit_reads
from clinical.connections import on_db_thread
from recordings.models import Recording

TABLE = Recording._meta.db_table
LIVE_OF_OWNER = "owner_id = %s AND deleted_at IS NULL"
FILTERS = {"status": "status = %s", "patient_ref": "patient_ref = %s"}
NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"


async def arecording_get(*, owner, recording_id: uuid.UUID, ip: str | None = None) -> dict:
    """The owner's live recording, its read audited; Recording.DoesNotExist for anyone else's."""
    return await on_db_thread(_recording_get, owner, ip, recording_id)


async def arecording_list(
    *,
    owner,
    status: str | None = None,
    patient_ref: str | None = None,
    limit: int = 50,
    offset: int = 0,
    ip: str | None = None,
) -> tuple[list[dict], int]:
    """A page of the owner's recordings, newest first, and how many match in all; each read audited."""
    filters = {"status": status, "patient_ref": patient_ref}
    return await on_db_thread(_recording_list, owner, ip, filters, limit, offset)


async def achanges_since(*, owner, since: int, limit: int, ip: str | None = None) -> tuple[list[dict], int, bool]:
    """The owner's recordings changed after cursor `since`, oldest change first: (changes, cursor, has_more).

    A row holds only its latest change, so each recording appears once, at its
    latest state; deleted ones come as tombstones.
    """
    return await on_db_thread(_changes_since, owner, ip, since, limit)


def _audited(read):
    """Run a read and audit the recordings it returns, in one transaction; the wrapped read takes `ip` second."""

    @wraps(read)
    def audited(owner, ip, *args):
        if not settings.CLINICAL_AUDIT_READS:
            return read(owner, *args)
        with transaction.atomic():
            result = read(owner, *args)
            audit_reads(actor=owner, recording_ids=_returned_ids(result), ip=ip)
        return result

    return audited


def _returned_ids(result) -> list:
    rows = result if isinstance(result, dict) else result[0]
    rows = [rows] if isinstance(rows, dict) else rows
    return [row["id"] for row in rows if not row.get("deleted")]


@_audited
def _recording_get(owner, recording_id: uuid.UUID) -> dict:
    sql = f"SELECT * FROM {TABLE} WHERE id = %s AND {LIVE_OF_OWNER}"  # noqa: S608 (constants only)
    rows = _rows(sql, [_db_id(recording_id), owner.pk], owner)
    if not rows:
        raise Recording.DoesNotExist
    return rows[0]


@_audited
def _recording_list(owner, filters: dict, limit: int, offset: int) -> tuple[list[dict], int]:
    where, params = LIVE_OF_OWNER, [owner.pk]
    for name, value in filters.items():
        if value is not None:
            where += f" AND {FILTERS[name]}"
            params.append(value)
    page_sql = f"SELECT * FROM {TABLE} WHERE {where} {NEWEST_FIRST} LIMIT %s OFFSET %s"  # noqa: S608
    page = _rows(page_sql, [*params, limit, offset], owner)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE {where}", params)  # noqa: S608
        (count,) = cursor.fetchone()
    return page, count


@_audited
def _changes_since(owner, since: int, limit: int) -> tuple[list[dict], int, bool]:
    sql = f"SELECT * FROM {TABLE} WHERE owner_id = %s AND change_seq > %s ORDER BY change_seq LIMIT %s"  # noqa: S608
    rows = _rows(sql, [owner.pk, since, limit + 1], owner)
    has_more = len(rows) > limit
    changes = [_change(row) for row in rows[:limit]]
    cursor = changes[-1]["change_seq"] if changes else since
    return changes, cursor, has_more


def _change(row: dict) -> dict:
    if row["deleted_at"] is None:
        return {**row, "deleted": False}
    # A tombstone carries no clinical content.
    keys = ("id", "owner", "version", "change_seq", "updated_at")
    return {**{key: row[key] for key in keys}, "deleted": True, "deleted_at": _utc(row["deleted_at"])}


def _rows(sql: str, params: list, owner) -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        names = [column[0] for column in cursor.description]
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        row["owner"] = owner.username
        row["verification_results"] = _json(row["verification_results"])
        for name in ("recorded_at", "created_at", "updated_at"):
            row[name] = _utc(row[name])
    return rows


def _json(value):
    # SQLite hands back the JSON text; PostgreSQL's driver decodes it already.
    return orjson.loads(value) if isinstance(value, (str, bytes)) else value


def _utc(value):
    # With USE_TZ, SQLite keeps UTC without an offset; PostgreSQL hands back aware datetimes.
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _db_id(recording_id: uuid.UUID):
    return Recording._meta.pk.get_db_prep_value(recording_id, connection)
