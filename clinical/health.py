"""Is the database usable: reachable, with every migration applied (and on SQLite, in WAL mode)."""

import os
from functools import cache

from django.db import DatabaseError, connection
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder


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
