"""copydb: move the clinic's SQLite database into an empty PostgreSQL database, verified.

The copy is one snapshot of SQLite, taken while the server may still run;
everything lands in PostgreSQL in one transaction, so that a refusal or a
failure leaves the target as it was (clinical.copydb).
"""

from django.core.management.base import BaseCommand, CommandError

from clinical.copydb import Copied, CopyError, database_copy, shown
from clinical.progress import stderr_progress

SNAPSHOT_NOTE = (
    "The copy is one snapshot of the SQLite database: stop the server first, "
    "or what it writes during and after the copy stays behind in SQLite."
)

WRITTEN_DURING_COPY = (
    "The SQLite database was written during the copy: the target holds its state as of the copy's start. "
    "Stop the server, and copy again into a new, empty database."
)


class Command(BaseCommand):
    help = "Copy the SQLite database into an empty PostgreSQL database (migrated first), verified."

    def add_arguments(self, parser):
        parser.add_argument(
            "--to", required=True, metavar="URL", help="the target: postgres://user[:password]@host[:port]/name"
        )

    def handle(self, *args, to: str, verbosity: int, **options):
        say = self.stdout.write if verbosity >= 1 else lambda line: None
        say(f"Copying the SQLite database into {shown(to)}. {SNAPSHOT_NOTE}")
        try:
            copied = database_copy(to, progress=lambda table: stderr_progress(f"  {table}", verbosity), say=say)
        except CopyError as exc:
            raise CommandError(str(exc)) from exc
        if verbosity >= 1:
            self._report(copied)

    def _report(self, copied: Copied) -> None:
        total = sum(copied.rows.values())
        self.stdout.write(f"Copied {copied.source} into {copied.target}:")
        width = max(map(len, copied.rows))
        for table, rows in copied.rows.items():
            self.stdout.write(f"  {table:<{width}}  {rows:>12,}")
        rate = total / copied.seconds if copied.seconds else 0
        self.stdout.write(f"  {'total':<{width}}  {total:>12,}  in {copied.seconds:.1f} s ({rate:,.0f} rows/s)")
        self.stdout.write(f"Verified: {'; '.join(copied.checks)}.")
        if copied.not_copied:
            self.stdout.write(f"Not copied (no model names them): {', '.join(copied.not_copied)}.")
        if copied.source_changed:
            self.stdout.write(self.style.WARNING(WRITTEN_DURING_COPY))
        self.stdout.write(
            self.style.SUCCESS("Done.") + f" Next: start the server with DATABASE_URL={copied.target}, and the "
            "same DJANGO_SECRET_KEY (or data/secret_key), which admin sessions depend on."
        )
