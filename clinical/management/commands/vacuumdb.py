"""vacuumdb: routine maintenance, and the purge of what has expired.

Checkpoints and truncates the WAL, rebuilds the file (VACUUM), refreshes the
query planner's statistics (PRAGMA optimize), and deletes expired tokens and
idempotency keys and old login attempts. VACUUM needs a moment with no other writer: run it when the
clinic is quiet.
"""

from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connection

from clinical.backups import database_path
from clinical.idempotency import idempotency_keys_purge
from clinical.throttle import login_attempts_purge
from clinical.tokens import tokens_purge_expired


class Command(BaseCommand):
    help = "Checkpoint the WAL, VACUUM, optimize, and purge expired tokens and idempotency keys."

    def handle(self, *args, verbosity: int, **options):
        before = self._sizes()
        tokens = tokens_purge_expired()
        keys = idempotency_keys_purge()
        attempts = login_attempts_purge()
        try:
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                cursor.execute("VACUUM")
                cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                cursor.execute("PRAGMA optimize")
        except OperationalError as exc:
            raise CommandError(f"Maintenance stopped: {exc}. Try again when the server is less busy.") from exc
        after = self._sizes()
        if verbosity >= 1:
            self.stdout.write(
                f"Purged {tokens:,} expired tokens, {keys:,} expired idempotency keys"
                f" and {attempts:,} old login attempts."
            )
            self.stdout.write(
                f"Database: {before[0]:,} -> {after[0]:,} bytes; WAL: {before[1]:,} -> {after[1]:,} bytes."
            )
            self.stdout.write(self.style.SUCCESS("Done."))

    @staticmethod
    def _sizes() -> tuple[int, int]:
        database = database_path()
        wal = database.with_name(database.name + "-wal")
        return (
            database.stat().st_size if database.exists() else 0,
            wal.stat().st_size if wal.exists() else 0,
        )
