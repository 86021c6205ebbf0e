"""verifydb: recompute every recording's digest and name the ones whose stored content no longer matches."""

from django.core.management.base import BaseCommand, CommandError

from clinical import sql
from clinical.backups import database_operations
from clinical.progress import stderr_progress
from recordings.digests import stored
from recordings.models import Recording

# Ids listed in full up to here; past it, the count (and the first ones).
LISTED = 1_000


class Command(BaseCommand):
    help = "Recompute every recording's digest; exit 1 listing the ids whose content does not match it."

    def handle(self, *args, verbosity: int, **options):
        if verbosity >= 1:
            self.stdout.write(database_operations().describe())
        total = Recording.objects.count()
        progress = stderr_progress("Verifying recordings", verbosity)
        checked, mismatched, altered = 0, 0, []
        for batch in stored(sql.db()):
            found = [rid for rid, kept, computed in batch if kept != computed]
            mismatched += len(found)
            altered += found[: LISTED - len(altered)]
            checked += len(batch)
            if progress:
                progress(checked, max(total, checked))
        if altered:
            for rid in altered:
                self.stdout.write(str(_as_uuid(rid)))
            shown = "listed above" if mismatched == len(altered) else f"the first {len(altered):,} listed above"
            raise CommandError(f"{mismatched:,} of {checked:,} recordings do not match their digest ({shown}).")
        if verbosity >= 1:
            self.stdout.write(self.style.SUCCESS(f"All {checked:,} recordings match their digests."))


def _as_uuid(value):
    return Recording._meta.pk.to_python(value)
