"""Restoring a backup over the live database, without bringing back what was revoked since.

A backup holds the tokens, admin sessions, password hashes and account flags
of its moment, and none of the login attempts made after it. Put back as they
are, a revoked token answers again, an old password opens its account again,
a deactivated account comes back to life and a throttled username starts
afresh. So a restore revokes every token and ends every admin session the
backup brings back (everyone logs in again), and carries each account's
security state and the throttle's recent attempts over from the database it
replaces: read with the ORM before the restore, written with the ORM after
it, so that the same code serves either engine. The restore is audited in
the restored database, in the same transaction as the revocation.

How a file is copied, checked and put back, and how the database it replaces
is saved, is the engine's (clinical.backups.database_operations()); every
step after that is the same on both.
"""

import getpass
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from clinical.audit import Action, audit_record
from clinical.backups import Backup, BackupError, Progress, UnreadableDatabase, database_operations
from clinical.changes import restart_above, sequence_high_water
from clinical.models import ChangeSequence, LoginAttempt, Token
from clinical.replication import ReplicaError, database_replication

# Devices hold cursors up to the replaced database's high water; the server may
# hand out a few numbers between reading it and the restore, never a million.
RESTORE_GAP = 1_000_000
ACCOUNT_FIELDS = ("password", "is_active", "is_staff", "is_superuser")
User = get_user_model()

Confirm = Callable[[Path | str, str], None]  # (what is restored, the live database): returns to go on, raises to stop


@dataclass
class SecurityState:
    """What a restore carries over from the database it replaces."""

    accounts: dict[str, dict] = field(default_factory=dict)  # username: ACCOUNT_FIELDS
    attempts: list[dict] = field(default_factory=list)  # the throttle's window
    unreadable: str | None = None  # why it could not be read


@dataclass
class Restored:
    file: Path | str  # a backup file, or the replica and the moment restored
    sha256: str
    safety: Backup | None  # None: there was no database to replace
    replaced_high_water: int
    renumbered: int = 0
    tokens_revoked: int = 0
    sessions_ended: int | None = 0  # None: every one, how many unknown (PostgreSQL)
    accounts_carried: int = 0
    accounts_changed: int = 0
    attempts_carried: int = 0
    accounts_not_replaced: list[str] = field(default_factory=list)  # in the backup only: left as restored
    unreadable: str | None = None

    @property
    def high_water(self) -> int:
        """Restored recordings are renumbered above this."""
        return self.replaced_high_water + RESTORE_GAP


def database_restore(
    file: Path,
    *,
    output_dir: Path,
    confirm: Confirm | None = None,
    progress: Progress | None = None,
    verbosity: int = 1,
) -> Restored:
    """Check a private copy of `file`, ask, save the live database, restore the copy, migrate, secure."""
    live = database_operations()
    with live.private_copy(file, output_dir) as (copy, digest):
        steps = {"output_dir": output_dir, "confirm": confirm, "progress": progress, "verbosity": verbosity}
        return copy_restore(live, copy, digest, shown_as=file.absolute(), **steps)


def replica_restore(
    moment: datetime | None,
    *,
    output_dir: Path,
    confirm: Confirm | None = None,
    progress: Progress | None = None,
    verbosity: int = 1,
) -> Restored:
    """Restore the replica's latest state, or its state at `moment`, with the same steps as a file."""
    live = database_operations()
    try:
        replication = database_replication()
        with replication.copy(output_dir, moment) as (copy, digest, shown_as):
            steps = {"output_dir": output_dir, "confirm": confirm, "progress": progress, "verbosity": verbosity}
            return copy_restore(live, copy, digest, shown_as=shown_as, **steps)
    except ReplicaError as exc:
        raise BackupError(str(exc)) from exc


def copy_restore(
    live, copy: Path, digest: str, *, shown_as, output_dir: Path, confirm, progress, verbosity: int
) -> Restored:
    """Check a private copy (`shown_as` to the operator), ask, save the live database, restore, migrate, secure."""
    live.inspect_restore_source(copy, shown_as=shown_as)
    if confirm is not None:
        confirm(shown_as, live.name)
    safety, state, replaced_high_water = _replaced_save(live, output_dir, progress)
    secured_at = timezone.now()
    try:
        # The backup's tokens and sessions end in the same step that puts it in place: not one request
        # may see a revoked token work again, not even while migrate runs.
        sessions_ended = live.restore(copy, secure=sign_out_everyone(secured_at))
    except BackupError as exc:
        saved = f" The database as it was is saved at {safety.path}." if safety else ""
        raise BackupError(f"{exc}{saved}") from exc
    call_command("migrate", interactive=False, verbosity=max(verbosity - 1, 0))
    restored = Restored(shown_as, digest, safety, replaced_high_water, unreadable=state.unreadable)
    restored.sessions_ended = sessions_ended
    return restored_secure(restored, state, secured_at)


def sign_out_everyone(at) -> list[tuple[str, str, list]]:
    """(table, statement, parameters) that revoke every token and end every admin session a backup brings back.

    Each runs only where its table exists: an older backup may lack one.
    """
    at = connection.ops.adapt_datetimefield_value(at)
    tokens, sessions = Token._meta.db_table, Session._meta.db_table
    revoke = f"UPDATE {tokens} SET revoked_at = %s WHERE revoked_at IS NULL AND expires_at > %s"  # noqa: S608
    return [(tokens, revoke, [at, at]), (sessions, f"DELETE FROM {sessions}", [])]  # noqa: S608 (table names only)


def _replaced_save(live, output_dir: Path, progress: Progress | None) -> tuple[Backup | None, SecurityState, int]:
    # Read right before the restore: what changes after it is lost with the rest.
    if not live.exists():
        return None, SecurityState(), 0
    try:
        safety = live.backup(output_dir, keep=None, progress=progress, damaged_ok=True)
    except UnreadableDatabase as exc:
        raise BackupError(
            f"The current database {live.name} cannot be read ({exc.reason}), so it cannot be saved before it is "
            "replaced: move it aside, then restore again. Nothing was restored."
        ) from exc
    state = security_state_read()
    try:
        high_water = sequence_high_water()
    except DatabaseError as exc:
        raise BackupError(
            f"Cannot read the change numbers of the current database ({exc}), which devices need to resync: "
            f"nothing was restored. The current database is saved at {safety.path}."
        ) from exc
    return safety, state, high_water


def security_state_read() -> SecurityState:
    """Each account's security state and the throttle's recent attempts, in the live database."""
    since = timezone.now() - timedelta(minutes=settings.CLINICAL_LOGIN_WINDOW_MINUTES)
    try:
        with transaction.atomic():  # one snapshot of both
            rows = User.objects.values(User.USERNAME_FIELD, *ACCOUNT_FIELDS)
            accounts = {row[User.USERNAME_FIELD]: {name: row[name] for name in ACCOUNT_FIELDS} for row in rows}
            attempts = list(
                LoginAttempt.objects.filter(started_at__gte=since).values(
                    "username", "client_ip", "started_at", "outcome"
                )
            )
    except DatabaseError as exc:
        return SecurityState(unreadable=str(exc))
    return SecurityState(accounts, attempts)


def restored_secure(restored: Restored, state: SecurityState, secured_at) -> Restored:
    """After the restore and migrate: renumber, carry over, audit; one transaction.

    The tokens and sessions ended as the backup went in (sign_out_everyone);
    whatever migrate or a late request left is ended here too.
    """
    with transaction.atomic():
        # Where writers run side by side (PostgreSQL), a write could take a number, or commit one, between
        # the renumbering's read and its update: hold the sequence's row, as every write does, till the end.
        list(ChangeSequence.objects.select_for_update().filter(pk=1))
        restored.renumbered = restart_above(restored.high_water)
        now = timezone.now()
        late = Token.objects.filter(revoked_at__isnull=True, expires_at__gt=now).update(revoked_at=now)
        restored.tokens_revoked = Token.objects.filter(revoked_at=secured_at).count() + late
        Session.objects.all().delete()
        if restored.safety is not None and state.unreadable is None:
            restored.accounts_carried, restored.accounts_changed, restored.accounts_not_replaced = accounts_carry(
                state.accounts
            )
            restored.attempts_carried = attempts_carry(state.attempts)
        audit_record(actor=_operator(), action=Action.RESTORE, detail=restore_detail(restored), ip=None)
    return restored


def accounts_carry(accounts: dict[str, dict]) -> tuple[int, int, list[str]]:
    """Give each restored account its state from `accounts`: (matched, changed, usernames not in `accounts`)."""
    carried, changed, missing = 0, 0, []
    for row in list(User.objects.values("pk", User.USERNAME_FIELD, *ACCOUNT_FIELDS)):
        username = row[User.USERNAME_FIELD]
        kept = accounts.get(username)
        if kept is None:
            missing.append(username)
            continue
        carried += 1
        if any(row[name] != kept[name] for name in ACCOUNT_FIELDS):
            User.objects.filter(pk=row["pk"]).update(**kept)
            changed += 1
    return carried, changed, sorted(missing)


def attempts_carry(attempts: list[dict]) -> int:
    """Put the replaced database's recent login attempts into the restored one; how many were added or ended."""
    if not attempts:
        return 0
    since = min(attempt["started_at"] for attempt in attempts)
    present = {
        (row.username, row.client_ip, row.started_at): row for row in LoginAttempt.objects.filter(started_at__gte=since)
    }
    added, ended = [], 0
    for attempt in attempts:
        twin = present.get((attempt["username"], attempt["client_ip"], attempt["started_at"]))
        if twin is None:
            added.append(LoginAttempt(**attempt))
        elif twin.outcome != attempt["outcome"]:  # pending in the backup, over since
            LoginAttempt.objects.filter(pk=twin.pk).update(outcome=attempt["outcome"])
            ended += 1
    LoginAttempt.objects.bulk_create(added)
    return len(added) + ended


def restore_detail(restored: Restored) -> str:
    """The audit event's text: files, digests and counts, never patient text."""
    parts = [f"restored {restored.file} (SHA-256 {restored.sha256})"]
    if restored.safety is None:
        parts.append("there was no database to replace")
    else:
        damaged = ", which fails its integrity check," if restored.safety.damaged else ""
        parts.append(f"the replaced database{damaged} was saved to {restored.safety.path}")
    sessions = "every" if restored.sessions_ended is None else str(restored.sessions_ended)
    parts.append(f"{restored.tokens_revoked} tokens revoked, {sessions} admin sessions ended")
    if restored.unreadable is not None:
        parts.append(f"no account state carried over: the replaced database could not be read ({restored.unreadable})")
    elif restored.safety is not None:
        parts.append(
            f"security state of {restored.accounts_carried} accounts carried over ({restored.accounts_changed} "
            f"changed), {restored.attempts_carried} recent login attempts"
        )
    if restored.accounts_not_replaced:
        parts.append(f"{len(restored.accounts_not_replaced)} accounts not in the replaced database left as restored")
    parts.append(
        f"change-number high water {restored.replaced_high_water}; "
        f"{restored.renumbered} recordings renumbered above {restored.high_water}"
    )
    return "; ".join(parts) + "."


def _operator() -> str:
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no login name and no password entry for this uid
        name = f"uid {os.getuid()}"
    return f"{name} (restoredb)"
