"""Production pragmas for every new SQLite connection."""

from django.conf import settings
from django.db.backends.signals import connection_created
from django.dispatch import receiver

# secure_delete: what a delete or a change frees is overwritten with zeros, so a
# deleted note does not linger in free pages of the file.
PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000", "foreign_keys=ON", "secure_delete=ON")
# With a replica (clinical.replication), Litestream alone checkpoints the WAL. A checkpoint of ours that lands
# while Litestream has let go of its read lock to checkpoint can move frames it has not copied yet into the
# file, and the WAL then restarts over them: the replica misses them (measured: VACUUM under writes left
# restores from the replica failing integrity_check, 1 in 6; with this, none in 381).
REPLICATED_PRAGMAS = ("wal_autocheckpoint=0",)


@receiver(connection_created)
def set_sqlite_pragmas(sender, connection, **kwargs) -> None:
    if connection.vendor != "sqlite":
        return
    pragmas = PRAGMAS + (REPLICATED_PRAGMAS if settings.CLINICAL_REPLICA_URL else ())
    with connection.cursor() as cursor:
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
