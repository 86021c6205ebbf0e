"""vacuumdb: routine maintenance, and the purge of what has expired.

Deletes expired tokens and idempotency keys and old login attempts, then
maintains the database. SQLite: checkpoints and truncates the WAL, rebuilds
the file (VACUUM) and refreshes the query planner's statistics (PRAGMA
optimize); VACUUM needs a moment with no other writer, so run it when the
clinic is quiet. PostgreSQL: VACUUM (ANALYZE), which runs beside the server's
reads and writes and makes dead rows' space reusable (the files rarely shrink).

With a replica configured (SQLite), Litestream checkpoints the WAL, not
this command, and the command waits until the replica holds the rebuilt
file before it says Done (or says that replication is not running).
"""

from django.core.management.base import BaseCommand, CommandError

from clinical.backups import BackupError, database_operations
from clinical.idempotency import idempotency_keys_purge
from clinical.replication import configured_replication
from clinical.throttle import login_attempts_purge
from clinical.tokens import tokens_purge_expired


class Command(BaseCommand):
    help = "Purge expired tokens and idempotency keys, then VACUUM and refresh the planner's statistics."

    def handle(self, *args, verbosity: int, **options):
        database = database_operations()
        if verbosity >= 1:
            self.stdout.write(database.describe())
        before = database.sizes()
        tokens = tokens_purge_expired()
        keys = idempotency_keys_purge()
        attempts = login_attempts_purge()
        try:
            database.maintain()
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        after = database.sizes()
        if verbosity >= 1:
            self.stdout.write(
                f"Purged {tokens:,} expired tokens, {keys:,} expired idempotency keys"
                f" and {attempts:,} old login attempts."
            )
            sizes = "; ".join(
                f"{what}: {old:,} -> {new:,} bytes" for (what, old), (_, new) in zip(before, after, strict=True)
            )
            self.stdout.write(f"{sizes}.")
        if (replication := configured_replication()) is not None:
            in_step, sentence = replication.report()
            self.stdout.write(sentence if in_step else self.style.WARNING(sentence))
        if verbosity >= 1:
            self.stdout.write(self.style.SUCCESS("Done."))
