"""Reads of recordings, run on the database thread; a clinician only ever sees their own.

The hot reads are SQL written out once, returning rows as dicts shaped like
RecordingOut, which the API renders with orjson as they are: building a
queryset, a model instance per row and a pydantic model per answer costs
several times more than SQLite takes to answer. The API calls each one in the
request's single hop to the database thread (clinical.tokens.as_user).
"""

import uuid
from functools import wraps

import orjson
from django.conf import settings
from django.db import transaction

from clinical import sql
from clinical.audit import audit_reads
from recordings.models import Recording
from recordings.schemas import OUT_FIELDS

TABLE = Recording._meta.db_table
# RecordingOut's fields but the owner's name, which is the caller's.
COLUMNS = [name for name in OUT_FIELDS if name != "owner"]
CHANGE_COLUMNS = [*COLUMNS, "change_seq", "deleted_at"]
LIVE_OF_OWNER = "owner_id = %s AND deleted_at IS NULL"
FILTERS = {"status": "status = %s", "patient_ref": "patient_ref = %s"}
NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"
TOMBSTONE_KEYS = ("id", "owner", "version", "change_seq", "updated_at", "deleted_at")


def _audited(read):
    """Run a read and audit the live recordings it returns, in one transaction.

    The read returns (answer, ids of the live recordings in it, as the database
    keeps them); the audited read also takes the caller's `ip` and returns the
    answer alone.
    """

    @wraps(read)
    def audited(owner, *, ip: str | None = None, **kwargs):
        if not settings.CLINICAL_AUDIT_READS:
            return read(owner, **kwargs)[0]
        with transaction.atomic():
            answer, read_ids = read(owner, **kwargs)
            audit_reads(actor=owner, recording_ids=read_ids, ip=ip)
        return answer

    return audited


@_audited
def recording_get(owner, *, recording_id: uuid.UUID) -> tuple[dict, list]:
    """The owner's live recording, its read audited; Recording.DoesNotExist for anyone else's."""
    db = sql.db()
    recording_id = Recording._meta.pk.get_db_prep_value(recording_id, db)
    statement = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE id = %s AND {LIVE_OF_OWNER}"  # noqa: S608
    rows, ids = _rows(db, statement, [recording_id, owner.pk], owner, COLUMNS)
    if not rows:
        raise Recording.DoesNotExist
    return rows[0], ids


@_audited
def recording_list(
    owner,
    *,
    status: str | None = None,
    patient_ref: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[dict, list]:
    """{"items", "count"}: a page of the owner's recordings, newest first, and how many match; each read audited."""
    db, where, params = sql.db(), LIVE_OF_OWNER, [owner.pk]
    for name, value in {"status": status, "patient_ref": patient_ref}.items():
        if value is not None:
            where += f" AND {FILTERS[name]}"
            params.append(value)
    page_sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE {where} {NEWEST_FIRST} LIMIT %s OFFSET %s"  # noqa: S608
    items, ids = _rows(db, page_sql, [*params, limit, offset], owner, COLUMNS)
    (count,) = sql.execute(db, f"SELECT COUNT(*) FROM {TABLE} WHERE {where}", params).fetchone()  # noqa: S608
    return {"items": items, "count": count}, ids


@_audited
def changes_since(owner, *, since: int, limit: int) -> tuple[dict, list]:
    """{"changes", "cursor", "has_more"}: the owner's recordings changed after cursor `since`, oldest change first.

    A row holds only its latest change, so each recording appears once, at its
    latest state; deleted ones come as tombstones.
    """
    statement = (
        f"SELECT {', '.join(CHANGE_COLUMNS)} FROM {TABLE} "  # noqa: S608 (constants only)
        "WHERE owner_id = %s AND change_seq > %s ORDER BY change_seq LIMIT %s"
    )
    rows, ids = _rows(sql.db(), statement, [owner.pk, since, limit + 1], owner, CHANGE_COLUMNS)
    has_more = len(rows) > limit
    rows, ids = rows[:limit], ids[:limit]
    live_ids = [db_id for row, db_id in zip(rows, ids, strict=True) if row["deleted_at"] is None]
    changes = [_change(row) for row in rows]
    cursor = changes[-1]["change_seq"] if changes else since
    return {"changes": changes, "cursor": cursor, "has_more": has_more}, live_ids


def _change(row: dict) -> dict:
    if row["deleted_at"] is None:
        row["deleted"] = False
        del row["deleted_at"]
        return row
    # A tombstone carries no clinical content.
    return {**{key: row[key] for key in TOMBSTONE_KEYS}, "deleted": True}


def _rows(db, statement: str, params: list, owner, columns: list[str]) -> tuple[list[dict], list]:
    """The rows as the API returns them, and their ids as the database keeps them."""
    rows = sql.execute(db, statement, params).fetchall()
    ids = [row[0] for row in rows]
    answers = []
    for row in rows:
        answer = dict(zip(columns, row, strict=True))
        answer["id"] = _api_id(answer["id"])
        answer["verification_results"] = _json(answer["verification_results"])
        answer["owner"] = owner.username
        answers.append(answer)
    return answers, ids


def _api_id(value):
    # SQLite keeps the hex digits; PostgreSQL's driver hands back a UUID.
    return uuid.UUID(hex=value) if isinstance(value, str) else value


def _json(value):
    # The stored JSON text goes out as it is (Django reads JSON columns as text on
    # SQLite and PostgreSQL alike); a driver that decodes JSON hands back objects.
    return orjson.Fragment(value) if isinstance(value, (str, bytes)) else value
