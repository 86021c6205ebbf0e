"""Login throttling: too many failed logins for a username, or from one address, and logins wait.

An attempt counts from the moment it starts. It is checked and recorded as
pending in one write transaction, before the password is hashed, and counts
as a failure until it succeeds. Writers take turns on that transaction
(SQLite's write lock; on PostgreSQL, advisory locks on the username and the
address), so a burst of concurrent attempts is checked one by one against
every attempt before it, across threads, workers and app servers.
"""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from clinical.audit import Action, audit_record
from clinical.locks import serialise
from clinical.models import LoginAttempt

FAILED = "failed"
THROTTLED = "throttled"
Outcome = LoginAttempt.Outcome


@transaction.atomic
def login_attempt_start(*, username: str, ip: str | None) -> tuple[int | None, int]:
    """(the attempt's id, 0) when it may go on; (None, seconds to wait) when throttled (audited then)."""
    serialise(f"login-user:{username}", *([f"login-ip:{ip}"] if ip else []))
    wait = login_retry_after(username=username, ip=ip)
    if wait:
        # Audited, but not an attempt: waiting out the window is enough.
        audit_record(actor=username, action=Action.LOGIN_FAILED, ip=ip, outcome=THROTTLED)
        return None, wait
    attempt = LoginAttempt.objects.create(username=username, client_ip=ip, started_at=timezone.now())
    return attempt.pk, 0


def login_attempt_end(attempt_id: int, *, succeeded: bool) -> None:
    """Call in the transaction that records the outcome (the token, or the failure's audit event)."""
    LoginAttempt.objects.filter(pk=attempt_id).update(outcome=Outcome.SUCCESS if succeeded else Outcome.FAILED)


@transaction.atomic
def login_failure_record(*, attempt_id: int, username: str, ip: str | None) -> None:
    login_attempt_end(attempt_id, succeeded=False)
    audit_record(actor=username, action=Action.LOGIN_FAILED, ip=ip, outcome=FAILED)


def login_retry_after(*, username: str, ip: str | None) -> int:
    """Seconds until a login for this username from this address may be tried; 0: now."""
    window = timedelta(minutes=settings.CLINICAL_LOGIN_WINDOW_MINUTES)
    waits = [_wait({"username": username}, settings.CLINICAL_LOGIN_MAX_FAILURES_PER_USER, window)]
    if ip:
        waits.append(_wait({"client_ip": ip}, settings.CLINICAL_LOGIN_MAX_FAILURES_PER_IP, window))
    return max(waits)


def login_attempts_purge() -> int:
    """Delete attempts that left the window long ago; how many went."""
    cutoff = timezone.now() - timedelta(minutes=settings.CLINICAL_LOGIN_WINDOW_MINUTES) - timedelta(days=1)
    deleted, _ = LoginAttempt.objects.filter(started_at__lt=cutoff).delete()
    return deleted


def _wait(who: dict, limit: int, window: timedelta) -> int:
    # Throttled while `limit` attempts that did not succeed lie in the window:
    # until the oldest of them leaves it. A pending attempt counts.
    now = timezone.now()
    recent = list(
        LoginAttempt.objects.filter(**who, started_at__gte=now - window)
        .exclude(outcome=Outcome.SUCCESS)
        .order_by("-started_at")
        .values_list("started_at", flat=True)[:limit]
    )
    if len(recent) < limit:
        return 0
    return max(int((recent[-1] + window - now).total_seconds()) + 1, 1)
