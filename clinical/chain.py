"""The audit trail's hash chain: events are sealed into it in id order, shortly after they are written.

Each event's hash covers its canonical form and the hash of the event sealed
before it (HMAC-SHA256 with CLINICAL_AUDIT_KEY when set, SHA-256 otherwise);
the first event follows GENESIS. The hashes live in their own append-only
table (AuditSeal), so no request writes more than its events, and no audited
read waits for another: a short sealing step (seal()) adds the events written
since the last one, in batches, as a Certificate Transparency log integrates
its entries. Each server process runs it every CLINICAL_AUDIT_SEAL_SECONDS;
verifyaudit and backupdb run it before they look.

Ids are sealed in order and never below the last one sealed. On PostgreSQL an
id can commit after a higher one (sequences do not commit in order), so the
step stops at a missing id until it appears or until the event after it is
GAP_GRACE old: a transaction that rolled back leaves its id unused for good.
The first seal starts at the lowest id there is.
An event that appears below the sealed ids later than that is reported by
verify() as inserted; the application's own transactions last milliseconds.

The canonical form of an event is one JSON array (orjson, no white space):
id, at (UTC, YYYY-MM-DDTHH:MM:SS.ffffffZ), user id, username, action,
recording id (36 lowercase characters, or null), fields, status_from,
status_to, client IP, outcome, detail. An event's hash is over the previous
hash's 64 hex digits, a newline, and that array.
"""

import hashlib
import hmac
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson
from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from clinical import sql
from clinical.locks import serialise
from clinical.models import AuditEvent, AuditSeal
from clinical.turns import sealer_turn, write_turn

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
GAP_GRACE = timedelta(seconds=10)
BATCH = 5_000
EVENTS = "clinical_auditevent"
SEALS = "clinical_auditseal"
EVENT_COLUMNS = (
    "id",
    "at",
    "user_id",
    "username",
    "action",
    "recording_id",
    "fields",
    "status_from",
    "status_to",
    "client_ip",
    "outcome",
    "detail",
)
# SQLite hands `at` back as its text, not parsed into a datetime, and moment()
# rewrites that text (5,000 events alone: hashing 1.6 against 2.4 µs an event,
# fetching 1.7 against 2.0).
_EVENTS_AFTER = {
    vendor: f"SELECT {', '.join(at if name == 'at' else name for name in EVENT_COLUMNS)} "  # noqa: S608
    f"FROM {EVENTS} WHERE id > %s ORDER BY id LIMIT %s"
    for vendor, at in (("sqlite", "CAST(at AS TEXT)"), ("postgresql", "at"))
}
_SEALS_AFTER = f"SELECT event_id, hash, recording_id FROM {SEALS} WHERE event_id > %s ORDER BY event_id LIMIT %s"  # noqa: S608
_RECORDING = EVENT_COLUMNS.index("recording_id")
_HEAD = f"SELECT event_id, hash FROM {SEALS} ORDER BY event_id DESC LIMIT 1"  # noqa: S608
# A batch's seals in one statement: row by row, the sealer would hold the write
# turn through a hand-over of the GIL for every event. A seal also carries its
# event's recording id, indexed there (recording_events()).
_SEAL = {
    "sqlite": f"INSERT INTO {SEALS} (event_id, hash, recording_id) "  # noqa: S608
    "SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(%s)",
    "postgresql": f"INSERT INTO {SEALS} (event_id, hash, recording_id) "  # noqa: S608
    "SELECT * FROM unnest(%s::bigint[], %s::varchar[], %s::uuid[])",
}


def moment(value: datetime | str) -> str:
    """A datetime in the canonical forms: UTC, microseconds always written.

    Or SQLite's text of one, UTC: YYYY-MM-DD HH:MM:SS.ffffff (Django leaves out
    .ffffff when it is zero).
    """
    if isinstance(value, str):
        if len(value) == 26 and value[10] == " ":
            return f"{value[:10]}T{value[11:]}Z"
        try:
            parsed = parse_datetime(value)
        except ValueError:
            parsed = None
        if parsed is None:
            return value  # not a time (written behind the application's back): it cannot match its seal
        value = parsed
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)  # SQLite hands back UTC without a zone
    return value.isoformat(timespec="microseconds") + "Z"


def event_hash(previous: str, row, key: bytes | None = None) -> str:
    """The hash of an event (a row of EVENT_COLUMNS, as the database returns it) after `previous`.

    `key`: CLINICAL_AUDIT_KEY, read once by a caller that hashes many events.
    """
    eid, at, user_id, username, action, recording_id, fields, status_from, status_to, ip, outcome, detail = row
    if recording_id is not None:
        recording_id = sql.uuid_text(recording_id)
    if isinstance(fields, (str, bytes)):
        fields = [] if fields == "[]" else orjson.loads(fields)  # a read's: most events
    canonical = [
        eid,
        moment(at),
        user_id,
        username,
        action,
        recording_id,
        fields,
        status_from,
        status_to,
        None if ip is None else str(ip),
        outcome,
        detail,
    ]
    message = previous.encode() + b"\n" + orjson.dumps(canonical)
    key = settings.CLINICAL_AUDIT_KEY if key is None else key
    if key:
        return hmac.digest(key, message, "sha256").hex()
    return hashlib.sha256(message).hexdigest()


def head(db=None) -> tuple[int, str]:
    """The last sealed event's id and hash: (0, GENESIS) before the first."""
    row = sql.execute(db or sql.db(), _HEAD).fetchone()
    return (0, GENESIS) if row is None else (row[0], row[1])


def recording_events(recording_id: uuid.UUID):
    """The ids of a recording's audit events, as a subquery: the sealed ones through
    their seals' index, the few written since the last seal by a scan of those alone.
    """
    sealed_to, _ = head()
    sealed = AuditSeal.objects.filter(recording_id=recording_id).values("event_id").order_by()
    pending = AuditEvent.objects.filter(id__gt=sealed_to, recording_id=recording_id).values("id").order_by()
    return sealed.union(pending, all=True)


def seal() -> tuple[int, str]:
    """Seal every event written since the last seal that can be; the head it leaves.

    Each batch is hashed before the write lock is taken, so writers wait only for
    its INSERT; the batch is dropped and hashed again if another sealer moved the
    head meanwhile (one sealer at a time writes: SQLite's lock, an advisory lock).
    """
    db, key = sql.db(), settings.CLINICAL_AUDIT_KEY
    while True:
        start = head(db)
        last_id, last_hash = start
        now = timezone.now()
        rows = sql.execute(db, _EVENTS_AFTER[db.vendor], [last_id, BATCH]).fetchall()
        seals = []
        for row in rows:
            if last_id and row[0] != last_id + 1 and not _gap_settled(row, now):
                break  # an id below this one may still commit
            last_id, last_hash = row[0], event_hash(last_hash, row, key)
            seals.append([last_id, last_hash, row[_RECORDING]])
        if not seals:
            return last_id, last_hash
        with write_turn(), transaction.atomic():
            serialise("audit-chain-seal")
            if head(db) != start:
                continue  # another process sealed these first
            sql.execute(db, _SEAL[db.vendor], _seal_params(db.vendor, seals))
        if len(seals) < BATCH:
            return last_id, last_hash


def _seal_params(vendor: str, seals: list) -> list:
    if vendor == "sqlite":
        return [orjson.dumps(seals).decode()]
    return [list(column) for column in zip(*seals, strict=True)]


def _gap_settled(row, now: datetime) -> bool:
    at = row[1] if isinstance(row[1], datetime) else parse_datetime(row[1])  # SQLite's text
    return now - (at if at.tzinfo else at.replace(tzinfo=UTC)) >= GAP_GRACE


@dataclass(frozen=True)
class Verdict:
    """What verify() found: the events it walked, the head, and the first break (None when whole)."""

    events: int
    last_id: int
    head: str
    problem: str | None
    head_found: bool | None


def verify(db=None, *, anchor: str | None = None, progress=None, total: int = 0) -> Verdict:
    """Walk every event and seal in id order, recomputing the chain; stop at the first break.

    `anchor`, a head printed earlier, must be one of the chain's hashes.
    """
    db = db or sql.db()
    previous, last_id, count, found = GENESIS, 0, 0, None if anchor is None else anchor == GENESIS
    sealed_to, _ = head(db)
    key = settings.CLINICAL_AUDIT_KEY
    for eid, event, sealed in _merged(db):
        if sealed is None:
            if eid < sealed_to:
                return Verdict(count, last_id, previous, _inserted(eid, last_id), found)
            break  # written since the last seal
        if event is None:
            return Verdict(count, last_id, previous, f"event {eid} was removed: its seal remains", found)
        _, stored, recording_id = sealed
        if event_hash(previous, event, key) != stored:
            return Verdict(count, last_id, previous, _changed(eid, last_id), found)
        if recording_id != event[_RECORDING]:
            problem = f"the seal of event {eid} names another recording: a search by recording would miss the event"
            return Verdict(count, last_id, previous, problem, found)
        previous, last_id, count = stored, eid, count + 1
        if anchor is not None:
            found = found or stored == anchor
        if progress and count % BATCH == 0:
            progress(count, max(total, count))
    return Verdict(count, last_id, previous, None, found)


def _inserted(eid: int, after: int) -> str:
    return f"event {eid} is not in the chain: it was inserted after event {after} was sealed"


def _changed(eid: int, after: int) -> str:
    return (
        f"event {eid} does not match its seal: it was changed, or moved, or an event between "
        f"{after} and it was removed with its seal"
    )


def _merged(db):
    """(id, event row or None, seal row or None) for every id that has an event or a seal, in order."""
    events, seals = _paged(db, _EVENTS_AFTER[db.vendor]), _paged(db, _SEALS_AFTER)
    event, seal_row = next(events, None), next(seals, None)
    while event is not None or seal_row is not None:
        eid = min(row[0] for row in (event, seal_row) if row is not None)
        this_event = event if event is not None and event[0] == eid else None
        this_seal = seal_row if seal_row is not None and seal_row[0] == eid else None
        yield eid, this_event, this_seal
        if this_event is not None:
            event = next(events, None)
        if this_seal is not None:
            seal_row = next(seals, None)


def _paged(db, statement: str):
    after = -(2**63)  # below any id, 0 and negative ones included
    while True:
        rows = sql.execute(db, statement, [after, BATCH]).fetchall()
        yield from rows
        if len(rows) < BATCH:
            return
        after = rows[-1][0]


def start_sealing() -> None:
    """Seal every CLINICAL_AUDIT_SEAL_SECONDS on a daemon thread of this process (none when 0)."""
    interval = settings.CLINICAL_AUDIT_SEAL_SECONDS
    if interval > 0:
        threading.Thread(target=_seal_forever, args=(interval,), name="audit-sealer", daemon=True).start()


def _seal_forever(interval: float) -> None:
    stop = threading.Event()
    while not stop.wait(interval):
        try:
            with sealer_turn() as mine:
                if mine:
                    seal()
        except Exception:
            # The database away or locked for long: the next round seals what is pending.
            logger.warning("Sealing the audit chain failed; retrying", exc_info=True)
        finally:
            connections.close_all()  # this thread's only: give PostgreSQL's pool its connection back
