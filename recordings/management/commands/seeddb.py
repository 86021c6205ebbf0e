"""seeddb: fill a database with realistic fake recordings, for demos and load tests.

Faker writes the patients' references, titles and transcripts: no real
patient data ever. Recordings go in by batches, with versions and change
numbers as if made through the API, so the sync feed sees every one.
"""

import sys
import time

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import IntegrityError

from clinical.progress import stderr_progress
from recordings.seeding import clear_recordings, seed_recordings


class Command(BaseCommand):
    help = "Create realistic fake recordings (no real patient data) for a clinician."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=100)
        parser.add_argument("--user", default="demo", help="the clinician; created when missing (default demo)")
        parser.add_argument("--seed", type=int, default=None, help="the same seed gives the same recordings")
        parser.add_argument("--clear", action="store_true", help="first delete the clinician's recordings outright")
        parser.add_argument("--yes", "--noinput", action="store_true", help="do not ask before --clear")

    def handle(self, *args, count: int, user: str, seed, clear: bool, yes: bool, verbosity: int, **options):
        if count < 0:
            raise CommandError("--count must be 0 or more.")
        owner, created = get_user_model().objects.get_or_create(username=user)
        if created:
            owner.set_unusable_password()
            owner.save(update_fields=["password"])
            self.stdout.write(f"Created the clinician {user!r} (no password: set one with changepassword).")
        if clear:
            self._confirm_clear(user, yes)
            self.stdout.write(f"Deleted {clear_recordings(owner=owner):,} recordings of {user!r}.")
        started = time.monotonic()
        try:
            made = seed_recordings(owner=owner, count=count, seed=seed, progress=stderr_progress("Seeding", verbosity))
        except IntegrityError as exc:
            raise CommandError(
                f"Recordings from seed {seed} exist already for {user!r}: add --clear, or use another --seed."
            ) from exc
        seconds = time.monotonic() - started
        self.stdout.write(self.style.SUCCESS(f"Seeded {made:,} recordings for {user!r} in {seconds:.1f} s."))

    def _confirm_clear(self, user: str, yes: bool) -> None:
        if yes:
            return
        if not sys.stdin.isatty():
            raise CommandError("Refusing to delete recordings without confirmation: pass --yes.")
        if input(f"Delete every recording of {user!r} for good? Type 'yes' to go on: ").strip().lower() != "yes":
            raise CommandError("Nothing was deleted or seeded.")
