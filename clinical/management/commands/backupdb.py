"""backupdb: a hot, checked backup of the database while the server runs.

Operations run it from cron or a systemd timer (see the README); a non-zero
exit means no new backup exists, and nothing half-written is left under a
backup's name.
"""

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from clinical.backups import BackupError, create_backup, database_path
from clinical.progress import stderr_progress


class Command(BaseCommand):
    help = "Back up the database, hot, into backups/clinical-<UTC timestamp>.db, checked, keeping the newest N."

    def add_arguments(self, parser):
        parser.add_argument("--output-dir", type=Path, default=settings.BASE_DIR / "backups")
        parser.add_argument("--keep", type=int, default=14, help="how many backups to keep (default 14)")

    def handle(self, *args, output_dir: Path, keep: int, verbosity: int, **options):
        if keep < 1:
            raise CommandError("--keep must be at least 1: a backup command that keeps nothing protects nothing.")
        progress = stderr_progress("Copying", verbosity)
        try:
            backup = create_backup(database_path(), output_dir.absolute(), keep=keep, progress=progress)
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        if verbosity >= 1:
            self.stdout.write(
                self.style.SUCCESS(f"Backed up to {backup.path}")
                + f" ({backup.size:,} bytes, {backup.recordings:,} recordings, {backup.seconds:.2f} s)"
            )
