"""Production pragmas for every new SQLite connection."""

from django.db.backends.signals import connection_created
from django.dispatch import receiver

# secure_delete: what a delete or a change frees is overwritten with zeros, so a
# deleted note does not linger in free pages of the file.
PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000", "foreign_keys=ON", "secure_delete=ON")


@receiver(connection_created)
def set_sqlite_pragmas(sender, connection, **kwargs) -> None:
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        for pragma in PRAGMAS:
            cursor.execute(f"PRAGMA {pragma}")
