"""The audit trail: who read or changed which recording, and who logged in.

Services write events in the same transaction as the work they record, so
nothing changes unaudited. Events are append-only: no code path updates or
deletes one, the admin offers neither, and the database refuses both
(triggers created by migration 0002).
"""

import uuid
from itertools import groupby
from operator import itemgetter

import orjson
from django.conf import settings
from django.utils import timezone

from clinical import sql
from clinical.models import AuditEvent

Action = AuditEvent.Action
APPEND_ONLY = "audit events are append-only"
TABLE = AuditEvent._meta.db_table
SEAL_TABLE = "clinical_auditseal"
COLUMNS = (
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
# Events are written in runs that share all but their recording id: those of
# one read, one seeding, one login. SQLite writes any number of runs in one
# statement, from JSON: the runs' shared values, and each run's ids. Row by row
# (executemany), a page of 50 reads took 6.9 µs an event, against 4.4, and the
# write turn was held through a hand-over of the GIL for every row: one
# statement is one, and outside a transaction, its own transaction
# (clinical.reads). On PostgreSQL a run is one statement over an array (a page
# of 50 reads: 1.2 ms, against 5.5 row by row), and psycopg sends the runs of
# a batch as one pipeline.
_SHARED = [name for name in COLUMNS if name != "recording_id"]
_FROM_JSON = ["event.value" if name == "recording_id" else f"run.value ->> {_SHARED.index(name)}" for name in COLUMNS]
_FROM_PARAMS = ["event.recording_id" if name == "recording_id" else "%s" for name in COLUMNS]
INSERT_SQL = {
    "sqlite": (
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT {', '.join(_FROM_JSON)} "  # noqa: S608 (names only)
        "FROM json_each(%s) AS run, json_each(%s, '$[' || run.key || ']') AS event"
    ),
    "postgresql": (
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT {', '.join(_FROM_PARAMS)} "  # noqa: S608 (names only)
        "FROM unnest(%s::uuid[]) AS event(recording_id)"
    ),
}


def audit_record(
    *, actor, action: str, recording_id=None, fields=(), status=None, ip=None, outcome="success", detail=None
):
    """Write one event; call it inside the transaction of the work it records.

    `actor` is a user, or a username for someone who is not one (a failed login).
    `status` is (old, new) when the status changed: the only values audited;
    field names only otherwise, never patient text; `detail` what an operation
    acted on (files, counts).
    """
    user = None if isinstance(actor, str) else actor
    status_from, status_to = status or ("", "")
    username = actor if user is None else user.get_username()
    target = [(recording_id, status_to)]
    events_write(_events(user, username, action, target, ip, outcome, sorted(fields), status_from, detail))


def audit_reads(*, actor, recording_ids: list, ip=None) -> None:
    """One read event per recording returned; a no-op when read auditing is off."""
    events_write(read_events(actor=actor, recording_ids=recording_ids, ip=ip))


def read_events(*, actor, recording_ids: list, ip=None) -> list:
    """The events of a read, not yet written: events_write() takes those of many reads in one statement.

    Empty when read auditing is off. The events' time is now, when the read was made.
    """
    if settings.CLINICAL_AUDIT_READS and recording_ids:
        return _events(actor, actor.get_username(), Action.READ, [(rid, "") for rid in recording_ids], ip)
    return []


def audit_many(*, actor, action: str, recording_ids: list, statuses: list | None = None, ip=None) -> None:
    """One event per recording (seeding, clearing), status_to from `statuses`."""
    if recording_ids:
        statuses = statuses or [""] * len(recording_ids)
        events_write(_events(actor, actor.get_username(), action, list(zip(recording_ids, statuses, strict=True)), ip))


def events_write(events: list) -> None:
    """Write events made by read_events() (of one call or of many, added up); in the caller's transaction.

    On SQLite in one statement, which outside a transaction is a transaction of its own.
    """
    if not events:
        return
    db = sql.db()
    if db.vendor == "sqlite":
        runs, ids = orjson.dumps([run[:-1] for run in events]), orjson.dumps([run[-1] for run in events])
        sql.execute(db, INSERT_SQL["sqlite"], [runs.decode(), ids.decode()])
    else:
        sql.executemany(db, INSERT_SQL[db.vendor], events)


def _events(user, username, action, targets, ip, outcome="success", fields=(), status_from="", detail=None) -> list:
    """One call's events: a run for each stretch of targets with the same status_to, its values shared, then its ids."""
    db = sql.db()
    at = db.ops.adapt_datetimefield_value(timezone.now())
    names = _prep(db, "fields", list(fields))
    user_id = getattr(user, "pk", None)
    events = []
    for status_to, run in groupby(targets, key=itemgetter(1)):
        ids = [_db_uuid(db, rid) for rid, _ in run]
        events.append([at, user_id, username, action, names, status_from, status_to, ip, outcome, detail, ids])
    return events


def _db_uuid(db, value):
    # Ids read by our own SQL are in the database's form already.
    return _prep(db, "recording_id", value) if isinstance(value, uuid.UUID) else value


def _prep(db, field: str, value):
    return AuditEvent._meta.get_field(field).get_db_prep_save(value, db)


def create_triggers(apps, schema_editor) -> None:
    for statement in triggers_sql(schema_editor.connection.vendor):
        schema_editor.execute(statement)


def drop_triggers(apps, schema_editor) -> None:
    for statement in drop_triggers_sql(schema_editor.connection.vendor):
        schema_editor.execute(statement)


def create_seal_triggers(apps, schema_editor) -> None:
    for statement in triggers_sql(schema_editor.connection.vendor, SEAL_TABLE):
        schema_editor.execute(statement)


def drop_seal_triggers(apps, schema_editor) -> None:
    for statement in drop_triggers_sql(schema_editor.connection.vendor, SEAL_TABLE):
        schema_editor.execute(statement)


def triggers_sql(vendor: str, table: str = TABLE) -> list[str]:
    """What makes `table` (the events', or the chain's seals') refuse UPDATE and DELETE."""
    if vendor == "sqlite":
        return [
            f"CREATE TRIGGER IF NOT EXISTS {table}_no_{event.lower()} BEFORE {event} ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            for event in ("UPDATE", "DELETE")
        ]
    if vendor == "postgresql":
        return [
            f"CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger AS $$ "
            f"BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$ LANGUAGE plpgsql",
            f"CREATE OR REPLACE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only()",
        ]
    return []


def drop_triggers_sql(vendor: str, table: str = TABLE) -> list[str]:
    if vendor == "sqlite":
        return [f"DROP TRIGGER IF EXISTS {table}_no_{event}" for event in ("update", "delete")]
    if vendor == "postgresql":
        statements = [f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}"]
        if table == TABLE:  # the function outlives the seals' trigger, which uses it too
            statements.append(f"DROP FUNCTION IF EXISTS {TABLE}_append_only() CASCADE")
        return statements
    return []
