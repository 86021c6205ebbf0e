"""Is the database usable: reachable, in WAL mode, with every migration applied."""

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
    """{"ready": bool, ...details}; never raises."""
    if connection.vendor == "sqlite" and not os.path.exists(connection.settings_dict["NAME"]):
        return {"ready": False, "detail": "The database file is missing."}
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode" if connection.vendor == "sqlite" else "SELECT 'n/a'")
            journal_mode = cursor.fetchone()[0]
        applied = MigrationRecorder(connection).applied_migrations()
    except DatabaseError as exc:
        return {"ready": False, "detail": f"The database is unusable: {exc}."}
    pending = len(migrations_on_disk() - set(applied))
    ready = pending == 0 and journal_mode in ("wal", "n/a")
    return {"ready": ready, "journal_mode": journal_mode, "pending_migrations": pending}
