"""backupdb: a hot, checked backup of the database while the server runs.

On SQLite, a copy through SQLite's online backup API (clinical-<stamp>.db);
on PostgreSQL, pg_dump's custom format (clinical-<stamp>.dump). Operations
run it from cron or a systemd timer (see the README); a non-zero exit means
no new backup exists, and nothing half-written is left under a backup's name.
"""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from clinical.backups import BackupError, database_operations
from clinical.chain import seal
from clinical.progress import stderr_progress


class Command(BaseCommand):
    help = (
        "Back up the database, hot, into backups/clinical-<UTC timestamp>.db (SQLite) or .dump (PostgreSQL), "
        "checked, keeping the newest N."
    )

    def add_arguments(self, parser):
        parser.add_argument("--output-dir", type=Path, default=settings.BASE_DIR / "backups")
        parser.add_argument("--keep", type=int, default=14, help="how many backups to keep (default 14)")

    def handle(self, *args, output_dir: Path, keep: int, verbosity: int, **options):
        if keep < 1:
            raise CommandError("--keep must be at least 1: a backup command that keeps nothing protects nothing.")
        database = database_operations()
        if verbosity >= 1:
            self.stdout.write(database.describe())
        # Sealed first, so the backup holds the chain up to the head printed: an auditor's anchor.
        head = seal()[1] if database.exists() else None
        progress = stderr_progress("Copying", verbosity)
        try:
            backup = database.backup(output_dir.absolute(), keep=keep, progress=progress)
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        if verbosity >= 1:
            self.stdout.write(
                self.style.SUCCESS(f"Backed up to {backup.path}")
                + f" ({backup.size:,} bytes, {backup.recordings:,} recordings, {backup.seconds:.2f} s)"
            )
            if head is not None:
                self.stdout.write(f"Audit chain head: {head}")
