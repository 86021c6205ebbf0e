"""Login throttling: too many failed logins for a username, or from one address, and logins wait.

Failures are counted from the audit trail itself, so the throttle holds across
restarts and worker processes, and there is nothing else to keep in step.
"""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from clinical.models import AuditEvent

FAILED = "failed"
THROTTLED = "throttled"


def login_retry_after(*, username: str, ip: str | None) -> int:
    """Seconds until a login for this username from this address may be tried; 0: now."""
    window = timedelta(minutes=settings.CLINICAL_LOGIN_WINDOW_MINUTES)
    since = timezone.now() - window
    failures = AuditEvent.objects.filter(action=AuditEvent.Action.LOGIN_FAILED, outcome=FAILED, at__gte=since)
    waits = [
        _wait(failures.filter(username=username), settings.CLINICAL_LOGIN_MAX_FAILURES_PER_USER, window),
        _wait(failures.filter(client_ip=ip), settings.CLINICAL_LOGIN_MAX_FAILURES_PER_IP, window) if ip else 0,
    ]
    return max(waits)


def _wait(failures, limit: int, window: timedelta) -> int:
    # Throttled while `limit` failures lie in the window: until the oldest of them leaves it.
    recent = list(failures.order_by("-at").values_list("at", flat=True)[:limit])
    if len(recent) < limit:
        return 0
    seconds = (recent[-1] + window - timezone.now()).total_seconds()
    return max(int(seconds) + 1, 1)
