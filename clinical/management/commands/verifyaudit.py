"""verifyaudit: seal what is pending, then walk the audit trail's hash chain from its first event.

Exits 0 printing the number of events and the head hash when the chain is
whole, 1 naming the first event that was changed, removed, inserted or
reordered; with --head, also 1 when that head, printed earlier (by backupdb
or verifyaudit), is no longer part of the chain.
"""

import re

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from clinical.backups import database_operations
from clinical.chain import seal, verify
from clinical.models import AuditCheck, AuditEvent
from clinical.progress import stderr_progress

HASH = re.compile(r"[0-9a-f]{64}")


class Command(BaseCommand):
    help = "Verify the audit trail's hash chain; exit 1 naming the first event changed, removed or inserted."

    def add_arguments(self, parser):
        parser.add_argument("--head", help="a head hash printed earlier, which must still be part of the chain")

    def handle(self, *args, head: str | None, verbosity: int, **options):
        if head is not None and not HASH.fullmatch(head):
            raise CommandError("--head takes a head hash as printed: 64 lowercase hex digits.")
        if verbosity >= 1:
            self.stdout.write(database_operations().describe())
        seal()
        progress = stderr_progress("Verifying audit events", verbosity)
        verdict = verify(anchor=head, progress=progress, total=AuditEvent.objects.count())
        problem = verdict.problem
        if problem is None and verdict.head_found is False:
            problem = f"head {head} is not part of the chain: the events after it were cut or rewritten"
        AuditCheck.objects.create(
            at=timezone.now(),
            events=verdict.events,
            head=verdict.head,
            last_event_id=verdict.last_id or None,
            ok=problem is None,
            detail=problem or "",
        )
        if problem is not None:
            raise CommandError(f"The audit chain is broken after {verdict.events:,} whole events: {problem}.")
        self.stdout.write(f"{verdict.events} events, head {verdict.head}")
