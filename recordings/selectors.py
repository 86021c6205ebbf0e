"""Reads of recordings, run on a reader thread; a clinician only ever sees their own.

The hot reads are SQL written out once, their rows made into dicts shaped like
RecordingOut, which the API renders with orjson as they are: building a
queryset, a model instance per row and a pydantic model per answer costs
several times more than SQLite takes to answer. The API calls each one in the
request's single hop to a reader thread (clinical.reads).

A page of the list or of the feed is bounded twice: by its `limit`, and by
settings.CLINICAL_PAGE_BUDGET, the bytes its recordings' text takes in the
answer's JSON (at least one recording a page, however large). The reader thread only
fetches a page's rows; the answer is built from them off that thread (Page).
"""

import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from functools import partial, wraps

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
CHANGE_SEQ, DELETED_AT = len(COLUMNS), len(COLUMNS) + 1
LIVE_OF_OWNER = "owner_id = %s AND deleted_at IS NULL"
FILTERS = {"status": "status = %s", "patient_ref": "patient_ref = %s"}
# deleted_at leads although every row listed has none: PostgreSQL counts only
# equalities, not IS NULL, as fixed, and would otherwise sort every row of the
# owner rather than walk the index in its order (SQLite walks it either way).
NEWEST_FIRST = "ORDER BY deleted_at, created_at DESC, id DESC"
TOMBSTONE_KEYS = ("id", "owner", "version", "change_seq", "updated_at", "deleted_at", "digest")
# What a row weighs against the page budget: its text columns as fetched (the JSON
# column as its stored text); numbers, dates, the id and the digest (64 characters)
# count for nothing. A text field added to RecordingOut stops the import here
# until _text() counts it.
TEXT_COLUMNS = [
    name
    for name in COLUMNS
    if Recording._meta.get_field(name).get_internal_type() in {"CharField", "TextField", "JSONField"}
    and name != "digest"
]
_REF, _TITLE, _TYPE, _STATUS, _AUDIO, _TRANSCRIPT, _RESULTS, _ERROR = map(COLUMNS.index, TEXT_COLUMNS)


@dataclass(frozen=True, slots=True)
class Page:
    """A page of the list or the feed as the database thread hands it back.

    `build()` makes the answer (RecordingList's or ChangesOut's shape) from the
    rows as fetched; the API calls it off the database thread, and in a worker
    thread when `text`, the bytes of JSON its recordings' text takes, says it is large.
    """

    build: Callable[[], dict]
    text: int


def _audited(read):
    """Run a read and audit the live recordings it returns, in one transaction.

    The read returns (answer, ids of the live recordings in it, as the database
    keeps them); the audited read also takes the caller's `ip` and returns the
    answer alone. The API runs the read itself (`.read`) through
    clinical.reads, which audits it in a group commit with other requests' reads.
    """

    @wraps(read)
    def audited(owner, *, ip: str | None = None, **kwargs):
        if not settings.CLINICAL_AUDIT_READS:
            return read(owner, **kwargs)[0]
        with transaction.atomic():
            answer, read_ids = read(owner, **kwargs)
            audit_reads(actor=owner, recording_ids=read_ids, ip=ip)
        return answer

    audited.read = read
    return audited


@_audited
def recording_get(owner, *, recording_id: uuid.UUID) -> tuple[dict, list]:
    """The owner's live recording, its read audited; Recording.DoesNotExist for anyone else's."""
    db = sql.db()
    recording_id = Recording._meta.pk.get_db_prep_value(recording_id, db)
    statement = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE id = %s AND {LIVE_OF_OWNER}"  # noqa: S608
    rows = sql.execute(db, statement, [recording_id, owner.pk]).fetchall()
    if not rows:
        raise Recording.DoesNotExist
    return _items(rows, COLUMNS, owner.username)[0], [rows[0][0]]


@_audited
def recording_list(
    owner,
    *,
    status: str | None = None,
    patient_ref: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[Page, list]:
    """A page of the owner's recordings, newest first, and how many match ({"items", "count"}); each read audited.

    The page may hold fewer than `limit` items when they are large (the page
    budget): the client moves `offset` on by the items it got.
    """
    db, where, params = sql.db(), LIVE_OF_OWNER, [owner.pk]
    for name, value in {"status": status, "patient_ref": patient_ref}.items():
        if value is not None:
            where += f" AND {FILTERS[name]}"
            params.append(value)
    rows, text, _ = _take(db, sql.execute(db, list_sql(where), [*params, limit, offset]))
    (count,) = sql.execute(db, f"SELECT COUNT(*) FROM {TABLE} WHERE {where}", params).fetchone()  # noqa: S608
    return Page(partial(_list_data, rows, owner.username, count), text), [row[0] for row in rows]


def list_sql(where: str) -> str:
    """A page of the list: its statement, for the filters in `where`."""
    return f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE {where} {NEWEST_FIRST} LIMIT %s OFFSET %s"  # noqa: S608


@_audited
def changes_since(owner, *, since: int, limit: int) -> tuple[Page, list]:
    """The owner's recordings changed after cursor `since`, oldest change first ({"changes", "cursor", "has_more"}).

    A row holds only its latest change, so each recording appears once, at its
    latest state; deleted ones come as tombstones. A page that the budget ends
    early says `has_more`, and its cursor is the last change it holds.
    """
    statement = (
        f"SELECT {', '.join(CHANGE_COLUMNS)} FROM {TABLE} "  # noqa: S608 (constants only)
        "WHERE owner_id = %s AND change_seq > %s ORDER BY change_seq LIMIT %s"
    )
    db = sql.db()
    rows, text, has_more = _take(db, sql.execute(db, statement, [owner.pk, since, limit + 1]))
    if len(rows) > limit:  # the row that says there is more, not part of the page
        text -= _text(rows.pop())
        has_more = True
    live_ids = [row[0] for row in rows if row[DELETED_AT] is None]
    cursor = rows[-1][CHANGE_SEQ] if rows else since
    return Page(partial(_changes_data, rows, owner.username, cursor, has_more), text), live_ids


def _take(db, cursor) -> tuple[list[tuple], int, bool]:
    """The cursor's rows up to the one that would take their text past the budget; their text; whether one was left.

    Never empty: a recording larger than the budget comes alone. Rows are
    fetched one at a time and the statement closed at the row that ends the
    page, so no row after that one is read.
    """
    budget, rows, text = settings.CLINICAL_PAGE_BUDGET, [], 0
    with db.wrap_database_errors, closing(cursor):
        for row in cursor:
            size = _text(row)
            if text + size > budget and rows:
                return rows, text, True
            rows.append(row)
            text += size
    return rows, text, False


def _text(row: tuple) -> int:
    # Written out: half the time of sum(map(len, ...)), on every row of every page.
    # The short fields are bounded (at most 834 characters in all); the long ones
    # are weighed in the bytes orjson will write for them.
    return (
        len(row[_REF])
        + len(row[_TITLE])
        + len(row[_TYPE])
        + len(row[_STATUS])
        + len(row[_AUDIO])
        + _json_bytes(row[_TRANSCRIPT])
        + _stored_json_bytes(row[_RESULTS])
        + _json_bytes(row[_ERROR])
    )


def _json_bytes(text: str) -> int:
    """What a string takes in JSON, quotes aside: its characters for plain ASCII, else more.

    A control character is written as six bytes, an emoji as four: counted in
    characters, a page of them would run six times over its budget. Measured by
    orjson itself: 0.2 µs for 3 KB of text, where searching it for characters to
    escape took 7.
    """
    return len(orjson.dumps(text)) - 2


def _stored_json_bytes(text) -> int:
    if not isinstance(text, str):
        return len(orjson.dumps(text))
    return len(text) if text.isascii() else len(text.encode())


def _list_data(rows: list[tuple], username: str, count: int) -> dict:
    return {"items": _items(rows, COLUMNS, username), "count": count}


def _changes_data(rows: list[tuple], username: str, cursor: int, has_more: bool) -> dict:
    changes = [_change(item) for item in _items(rows, CHANGE_COLUMNS, username)]
    return {"changes": changes, "cursor": cursor, "has_more": has_more}


def _change(row: dict) -> dict:
    if row["deleted_at"] is None:
        row["deleted"] = False
        del row["deleted_at"]
        return row
    # A tombstone carries no clinical content.
    return {**{key: row[key] for key in TOMBSTONE_KEYS}, "deleted": True}


def _items(rows: list[tuple], columns: list[str], username: str) -> list[dict]:
    """The rows as the API returns them; no database work, so it runs on any thread."""
    answers = []
    for row in rows:
        answer = dict(zip(columns, row, strict=True))
        answer["id"] = sql.uuid_text(answer["id"])
        answer["verification_results"] = sql.json_out(answer["verification_results"])
        answer["owner"] = username
        answers.append(answer)
    return answers
