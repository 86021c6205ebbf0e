"""The audit trail: who read or changed which recording, and who logged in.

Services write events in the same transaction as the work they record, so
nothing changes unaudited. Events are append-only: no code path updates or
deletes one, the admin offers neither, and the database refuses both
(triggers created by migration 0002).
"""

from django.conf import settings
from django.db import connection
from django.utils import timezone

from clinical.models import AuditEvent

Action = AuditEvent.Action
APPEND_ONLY = "audit events are append-only"
TABLE = AuditEvent._meta.db_table
SQLITE_TRIGGERS = {f"{TABLE}_no_update": "UPDATE", f"{TABLE}_no_delete": "DELETE"}
INSERT_SQL = (
    f"INSERT INTO {TABLE} (at, user_id, username, action, recording_id, fields, status_from, status_to, "  # noqa: S608
    "client_ip, outcome) VALUES (%s, %s, %s, %s, %s, '[]', '', %s, %s, 'success')"
)


def audit_record(*, actor, action: str, recording_id=None, fields=(), status=None, ip=None, outcome="success"):
    """Write one event; call it inside the transaction of the work it records.

    `actor` is a user, or a username for someone who is not one (a failed login).
    `status` is (old, new) when the status changed: the only values audited;
    field names only otherwise, never patient text.
    """
    user = None if isinstance(actor, str) else actor
    status_from, status_to = status or ("", "")
    return AuditEvent.objects.create(
        at=timezone.now(),
        user_id=getattr(user, "pk", None),
        username=actor if user is None else user.get_username(),
        action=action,
        recording_id=recording_id,
        fields=sorted(fields),
        status_from=status_from,
        status_to=status_to,
        client_ip=ip,
        outcome=outcome,
    )


def audit_reads(*, actor, recording_ids: list, ip=None) -> None:
    """One read event per recording returned; a no-op when read auditing is off."""
    if settings.CLINICAL_AUDIT_READS:
        audit_many(actor=actor, action=Action.READ, recording_ids=recording_ids, ip=ip)


def audit_many(*, actor, action: str, recording_ids: list, statuses: list | None = None, ip=None) -> None:
    """One event per recording, with one statement prepared once (reads run on every GET)."""
    if not recording_ids:
        return
    at = connection.ops.adapt_datetimefield_value(timezone.now())
    prep = AuditEvent._meta.get_field("recording_id").get_db_prep_value
    statuses = statuses or [""] * len(recording_ids)
    rows = [
        [at, actor.pk, actor.get_username(), action, prep(recording_id, connection), status, ip]
        for recording_id, status in zip(recording_ids, statuses, strict=True)
    ]
    with connection.cursor() as cursor:
        cursor.executemany(INSERT_SQL, rows)


def create_triggers(apps, schema_editor) -> None:
    for sql in triggers_sql(schema_editor.connection.vendor):
        schema_editor.execute(sql)


def drop_triggers(apps, schema_editor) -> None:
    for sql in drop_triggers_sql(schema_editor.connection.vendor):
        schema_editor.execute(sql)


def triggers_sql(vendor: str) -> list[str]:
    if vendor == "sqlite":
        return [
            f"CREATE TRIGGER IF NOT EXISTS {name} BEFORE {event} ON {TABLE} "
            f"BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END"
            for name, event in SQLITE_TRIGGERS.items()
        ]
    if vendor == "postgresql":
        return [
            f"CREATE OR REPLACE FUNCTION {TABLE}_append_only() RETURNS trigger AS $$ "
            f"BEGIN RAISE EXCEPTION '{APPEND_ONLY}'; END $$ LANGUAGE plpgsql",
            f"CREATE TRIGGER {TABLE}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {TABLE} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_append_only()",
        ]
    return []


def drop_triggers_sql(vendor: str) -> list[str]:
    if vendor == "sqlite":
        return [f"DROP TRIGGER IF EXISTS {name}" for name in SQLITE_TRIGGERS]
    if vendor == "postgresql":
        return [
            f"DROP TRIGGER IF EXISTS {TABLE}_append_only ON {TABLE}",
            f"DROP FUNCTION IF EXISTS {TABLE}_append_only()",
        ]
    return []
