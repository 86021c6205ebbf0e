"""Login throttling: too many failed logins for a username, or from one address, and logins wait.

Failures are counted from the audit trail itself, so the throttle holds across
restarts and worker processes, and there is nothing else to keep in step.
"""

from datetime import UTC, timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from clinical.models import AuditEvent

FAILED = "failed"
THROTTLED = "throttled"


def login_retry_after(*, username: str, ip: str | None) -> int:
    """Seconds until a login for this username from this address may be tried; 0: now."""
    window = timedelta(minutes=settings.CLINICAL_LOGIN_WINDOW_MINUTES)
    waits = [_wait("username", username, settings.CLINICAL_LOGIN_MAX_FAILURES_PER_USER, window)]
    if ip:
        waits.append(_wait("client_ip", ip, settings.CLINICAL_LOGIN_MAX_FAILURES_PER_IP, window))
    return max(waits)


def _wait(column: str, value: str, limit: int, window: timedelta) -> int:
    # Throttled while `limit` failures lie in the window: until the oldest of them leaves it.
    # The action is written out, not a parameter, so that SQLite can use the partial index.
    sql = (
        f"SELECT at FROM {AuditEvent._meta.db_table} WHERE action = 'login_failed' "  # noqa: S608 (constants)
        f"AND {column} = %s AND at >= %s AND outcome = %s ORDER BY at DESC LIMIT %s"
    )
    since = connection.ops.adapt_datetimefield_value(timezone.now() - window)
    with connection.cursor() as cursor:
        cursor.execute(sql, [value, since, FAILED, limit])
        recent = [row[0] for row in cursor.fetchall()]
    if len(recent) < limit:
        return 0
    oldest = recent[-1] if recent[-1].tzinfo else recent[-1].replace(tzinfo=UTC)
    return max(int((oldest + window - timezone.now()).total_seconds()) + 1, 1)
