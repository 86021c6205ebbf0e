"""restoredb: put a backup back, safely, even while the server runs.

It copies FILE privately and checks that copy (a sound clinical database this
code knows), asks, backs up the current database, restores the copy (SQLite:
through SQLite's backup API, never by copying files over an open database;
PostgreSQL: a pg_dump file, put back by pg_restore in one transaction that the
server's connections wait for), migrates, and moves the sync change sequence
past every number handed out before, so that devices pull the restored state.
Every token and admin session the backup brings back is ended, and each
account keeps the password and status it had in the database replaced
(clinical.restore).

With --from-replica (SQLite, CLINICAL_REPLICA_URL set), Litestream restores
the replica's latest state, or its state at --timestamp, into a private
temporary file, which then goes through the same steps; replication, paused
while the file is rewritten, carries on from the restored database.
"""

import sys
from argparse import ArgumentTypeError
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from clinical.backups import BackupError, database_operations
from clinical.progress import stderr_progress
from clinical.replication import configured_replication
from clinical.restore import Restored, database_restore, replica_restore

FILE_OR_REPLICA = "Name a backup FILE to restore, or --from-replica; not both."
TIMESTAMP_WITHOUT_REPLICA = "--timestamp picks a moment of the replica: use it with --from-replica."


class Command(BaseCommand):
    help = "Restore the database from a backup file, after backing up the current one."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path, nargs="?", help="a backup made by backupdb")
        parser.add_argument(
            "--from-replica", action="store_true", help="restore from the replica (CLINICAL_REPLICA_URL) instead"
        )
        parser.add_argument(
            "--timestamp",
            type=moment,
            help="with --from-replica: the state at this moment (ISO 8601; UTC unless it names a zone)",
        )
        parser.add_argument("--yes", "--noinput", action="store_true", help="do not ask for confirmation")
        parser.add_argument("--output-dir", type=Path, default=settings.BASE_DIR / "backups")

    def handle(self, *args, file, from_replica, timestamp, yes, output_dir: Path, verbosity: int, **options):
        if (file is None) == (not from_replica):
            raise CommandError(FILE_OR_REPLICA)
        if timestamp is not None and not from_replica:
            raise CommandError(TIMESTAMP_WITHOUT_REPLICA)
        if verbosity >= 1:
            self.stdout.write(database_operations().describe())
        steps = {
            "output_dir": output_dir.absolute(),
            "confirm": None if yes else self._confirm,
            "progress": stderr_progress("Backing up", verbosity),
            "verbosity": verbosity,
        }
        try:
            restored = replica_restore(timestamp, **steps) if from_replica else database_restore(file, **steps)
        except BackupError as exc:
            raise CommandError(str(exc)) from exc
        self._report(restored)
        if (replication := configured_replication()) is not None:
            in_step, sentence = replication.report()
            self.stdout.write(sentence if in_step else self.style.WARNING(sentence))

    def _confirm(self, file, live: str) -> None:
        if not sys.stdin.isatty():
            raise CommandError("Refusing to restore without confirmation: run it on a terminal, or pass --yes.")
        answer = input(f"Replace the database {live} with {file}? Type 'yes' to go on: ")
        if answer.strip().lower() != "yes":
            raise CommandError("Nothing was restored.")

    def _report(self, restored: Restored) -> None:
        safety = restored.safety
        if safety is not None and safety.damaged:
            self.stdout.write(self.style.WARNING(f"The current database, damaged, was saved to {safety.path} first."))
        elif safety is not None:
            self.stdout.write(f"Backed up the current database to {safety.path} first.")
        else:
            self.stdout.write("There was no database to replace: nothing to back up, no account state to carry over.")
        self.stdout.write(
            f"Revoked {restored.tokens_revoked:,} tokens and ended "
            f"{'every' if restored.sessions_ended is None else format(restored.sessions_ended, ',')} admin sessions: "
            "everyone logs in again."
        )
        if restored.unreadable is not None:
            self.stdout.write(
                self.style.WARNING(
                    f"Could not read the accounts of the database replaced ({restored.unreadable}): passwords and "
                    "account status are as in the backup, and recent failed logins no longer count. Check the "
                    "accounts in the admin."
                )
            )
        elif restored.safety is not None:
            self.stdout.write(
                f"Carried over the password and status of {restored.accounts_carried:,} accounts "
                f"({restored.accounts_changed:,} changed since the backup) and {restored.attempts_carried:,} "
                "recent login attempts from the database replaced."
            )
        if restored.accounts_not_replaced:
            self.stdout.write(
                self.style.WARNING(
                    "These accounts were not in the database replaced (deleted since the backup?) and are back as "
                    f"they were in it: {', '.join(restored.accounts_not_replaced)}. Deactivate any that should not be."
                )
            )
        self.stdout.write(
            self.style.SUCCESS(f"Restored {restored.file}")
            + f"; {restored.renumbered:,} recordings will sync again to every device"
            f" (changes from {restored.high_water + 1:,} on)."
        )


def moment(value: str) -> datetime:
    """An ISO 8601 moment, in UTC; one without a zone is taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ArgumentTypeError(f"not an ISO 8601 moment: {value!r} (such as 2026-12-03T14:05:00Z)") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
