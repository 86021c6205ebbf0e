"""Production pragmas for every new SQLite connection."""

from django.db.backends.signals import connection_created
from django.dispatch import receiver

PRAGMAS = ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=5000", "foreign_keys=ON")


@receiver(connection_created)
def set_sqlite_pragmas(sender, connection, **kwargs) -> None:
    if connection.vendor != "sqlite":
        return
    with connection.cursor() as cursor:
        for pragma in PRAGMAS:
            cursor.execute(f"PRAGMA {pragma}")
