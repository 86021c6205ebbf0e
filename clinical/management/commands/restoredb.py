"""restoredb: put a backup back, safely, even while the server runs.

It refuses anything that is not a sound clinical database this code knows,
backs up the current database first, restores through SQLite's backup API
(never by copying files over an open database), migrates, and moves the sync
change sequence past every number handed out before, so that devices pull
the restored state.
"""

import sys
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from clinical.backups import BackupError, create_backup, database_path, inspect_restore_source, restore_into
from clinical.changes import restart_above, sequence_high_water
from clinical.progress import stderr_progress

RESTORE_GAP = 1_000_000


class Command(BaseCommand):
    help = "Restore the database from a backup file, after backing up the current one."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--yes", "--noinput", action="store_true", help="do not ask for confirmation")
        parser.add_argument("--output-dir", type=Path, default=settings.BASE_DIR / "backups")

    def handle(self, *args, file: Path, yes: bool, output_dir: Path, verbosity: int, **options):
        try:
            inspect_restore_source(file)
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        if not yes:
            self._confirm(file)
        try:
            live = database_path()
            if live.exists():
                safety = create_backup(
                    live, output_dir.absolute(), keep=None, progress=stderr_progress("Backing up", verbosity)
                )
                self.stdout.write(f"Backed up the current database to {safety.path} first.")
            # Read right before the copy, and leave a wide gap: the server may
            # hand out a few numbers in between, never a million.
            high_water = (sequence_high_water() if live.exists() else 0) + RESTORE_GAP
            restore_into(file, live)
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        call_command("migrate", interactive=False, verbosity=max(verbosity - 1, 0))
        renumbered = restart_above(high_water)
        self.stdout.write(
            self.style.SUCCESS(f"Restored {file}")
            + f"; {renumbered:,} recordings will sync again to every device (changes from {high_water + 1:,} on)."
        )

    def _confirm(self, file: Path) -> None:
        if not sys.stdin.isatty():
            raise CommandError("Refusing to restore without confirmation: run it on a terminal, or pass --yes.")
        answer = input(f"Replace the database {database_path()} with {file}? Type 'yes' to go on: ")
        if answer.strip().lower() != "yes":
            raise CommandError("Nothing was restored.")
