"""Is the database usable: reachable, with every migration applied (and on SQLite, in WAL mode); is it replicated."""

import os
from functools import cache

from django.conf import settings
from django.db import DatabaseError, connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder

from clinical.replication import ReplicaError, database_replication


@cache
def migrations_on_disk() -> frozenset[tuple[str, str]]:
    # The code does not change while the server runs: read the graph once.
    return frozenset(MigrationLoader(None, ignore_no_migrations=True).graph.nodes)


def database_state() -> dict:
    """{"ready": bool, "engine": ..., ...details}; never raises."""
    engine = connection.vendor  # "sqlite" or "postgresql", as the contract names them
    if engine == "sqlite" and not os.path.exists(connection.settings_dict["NAME"]):
        return {"ready": False, "engine": engine, "detail": "The database file is missing."}
    try:
        details = {"journal_mode": _journal_mode()} if engine == "sqlite" else {}
        applied = MigrationRecorder(connection).applied_migrations()
    except DatabaseError as exc:
        return {"ready": False, "engine": engine, "detail": f"The database is unusable: {exc}."}
    pending = len(migrations_on_disk() - set(applied))
    ready = pending == 0 and details.get("journal_mode", "wal") == "wal"
    return {"ready": ready, "engine": engine, **details, "pending_migrations": pending}


def _journal_mode() -> str:
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        return cursor.fetchone()[0]


async def areplication_state() -> dict | None:
    """Health's `replication` when a replica is configured: {running, lag_seconds, ...}; never a secret.

    Read from Litestream's control socket without the database thread: a
    replica that lags or is down never makes health wait or fail.
    """
    if not settings.CLINICAL_REPLICA_URL:
        return None
    try:
        replication = database_replication()
    except ReplicaError as exc:  # PostgreSQL: the setting does nothing there
        return {"running": False, "lag_seconds": None, "detail": str(exc)}
    return await replication.astate()
