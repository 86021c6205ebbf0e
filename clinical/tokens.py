"""Bearer tokens: issue, check and revoke; only a hash of each secret is kept."""

import hashlib
import logging
import secrets
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import check_password, make_password
from django.db import DatabaseError, transaction
from django.http import HttpResponse
from django.utils import timezone
from ninja.errors import AuthenticationError
from ninja.security import HttpBearer

from clinical import sql
from clinical.audit import Action, audit_record
from clinical.connections import on_db_thread
from clinical.models import Token
from clinical.responses import database_unavailable, json_response
from clinical.throttle import FAILED, THROTTLED, login_retry_after

logger = logging.getLogger(__name__)
MAX_TOKEN_LENGTH = 256
UNAUTHORIZED = "Missing, unknown, expired or revoked token."
LAST_USED_RESOLUTION = timedelta(minutes=1)
User = get_user_model()
# What the API needs of its user; anything else is loaded on first use.
# In model order: from_db() maps values to the model's fields in that order.
USER_FIELDS = [
    field.attname
    for field in User._meta.concrete_fields
    if field.attname in {"id", "username", "is_active", "is_staff", "is_superuser"}
]
# The last column says whether last_used_at is older than the second parameter:
# compared in SQL, so no datetime is parsed on every request.
TOKEN_USER_SQL = (
    f"SELECT {', '.join('u.' + name for name in USER_FIELDS)}, t.id, "  # noqa: S608 (names only)
    "(t.last_used_at IS NULL OR t.last_used_at < %s) "
    f"FROM {Token._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id "
    "WHERE t.key_hash = %s AND t.revoked_at IS NULL AND t.expires_at > %s AND u.is_active = %s"
)
LAST_USED_SQL = f"UPDATE {Token._meta.db_table} SET last_used_at = %s WHERE id = %s"  # noqa: S608


def hash_token(raw: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


class LoginRefused(Exception):
    """Wrong credentials (401), or too many failures lately (429 after `retry_after` seconds)."""

    def __init__(self, retry_after: int = 0):
        super().__init__(retry_after)
        self.retry_after = retry_after


async def alogin(*, username: str, password: str, ip: str | None) -> tuple[str, Token]:
    """Check the throttle, then the credentials; a new token, or LoginRefused. Every attempt is audited."""
    retry_after = await on_db_thread(login_retry_after, username=username, ip=ip)
    if retry_after:
        await on_db_thread(login_failure_record, username=username, ip=ip, outcome=THROTTLED)
        raise LoginRefused(retry_after)
    user = await auser_authenticate(username=username, password=password)
    if user is None:
        await on_db_thread(login_failure_record, username=username, ip=ip, outcome=FAILED)
        raise LoginRefused
    return await on_db_thread(token_issue, user=user, ip=ip)


@transaction.atomic
def login_failure_record(*, username: str, ip: str | None, outcome: str) -> None:
    audit_record(actor=username, action=Action.LOGIN_FAILED, ip=ip, outcome=outcome)


@transaction.atomic
def token_issue(*, user, ip: str | None = None) -> tuple[str, Token]:
    raw = secrets.token_urlsafe(32)
    now = timezone.now()
    token = Token.objects.create(
        user=user, key_hash=hash_token(raw), created_at=now, expires_at=now + settings.CLINICAL_TOKEN_TTL
    )
    audit_record(actor=user, action=Action.LOGIN, ip=ip)
    return raw, token


@transaction.atomic
def token_revoke(*, token_id: int, actor, ip: str | None = None) -> None:
    if Token.objects.filter(pk=token_id, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        audit_record(actor=actor, action=Action.TOKEN_REVOKED, ip=ip)


@transaction.atomic
def tokens_purge_expired() -> int:
    """Delete tokens that expired; how many went."""
    deleted, _ = Token.objects.filter(expires_at__lt=timezone.now()).delete()
    return deleted


class UncheckedToken:
    """A bearer token as presented, not yet looked up: request.auth until the request's hop checks it."""

    __slots__ = ("key_hash",)

    def __init__(self, raw: str):
        self.key_hash = hash_token(raw)


async def as_user(request, function, /, *args, **kwargs):
    """function(user, *args, **kwargs) on the database thread, the request's token checked first in the same hop.

    One hop a request, for the check and the work together. A token that is not
    valid raises AuthenticationError (401) there, before the work starts.
    """
    return await on_db_thread(_as_user, request, function, args, kwargs)


def _as_user(request, function, args, kwargs):
    user = checked_user(request)
    if user is None:
        raise AuthenticationError
    return function(user, *args, **kwargs)


def checked_user(request):
    """On the database thread: the request's user once its token is checked, or None for a token not valid."""
    if isinstance(request.auth, UncheckedToken):
        request.auth = _token_user(request.auth.key_hash)
    return request.auth


async def answer_unchecked(request, response):
    """The answer, or 401 when it was reached before the request's token was checked and the token is not valid.

    Input refused before any work (422, 400) is answered without a hop; the
    token is checked then, so that a bad token always answers 401 first; if the
    check cannot be made, 503 as for any request then. A 5xx stands.
    """
    if isinstance(getattr(request, "auth", None), UncheckedToken) and response.status_code < 500:
        if response.status_code < 400:
            raise RuntimeError("an endpoint answered without checking the token: call it through as_user()")
        try:
            user = await on_db_thread(checked_user, request)
        except DatabaseError:
            logger.exception("database unavailable")
            return database_unavailable()
        if user is None:
            return unauthorized()
    return response


def unauthorized() -> HttpResponse:
    response = json_response({"detail": UNAUTHORIZED}, status=401)
    response["WWW-Authenticate"] = "Bearer"
    return response


def _token_user(key_hash: str):
    # Every request runs this: SQL written out once, not a queryset compiled each time.
    db, now = sql.db(), timezone.now()
    stamp, stale = (db.ops.adapt_datetimefield_value(moment) for moment in (now, now - LAST_USED_RESOLUTION))
    row = sql.execute(db, TOKEN_USER_SQL, [stale, key_hash, stamp, True]).fetchone()
    if row is None:
        return None
    *user_values, token_id, last_used_stale = row
    if last_used_stale:
        # At most once a minute a token: a write on every request would queue behind writers.
        sql.execute(db, LAST_USED_SQL, [stamp, token_id])
    user = User.from_db(db.alias, USER_FIELDS, user_values)
    user.token_id = token_id
    return user


async def auser_authenticate(*, username: str, password: str):
    """The active user with these credentials, or None.

    The password hash (about half a second of CPU by design) is checked off the
    database thread, so a login never holds up other requests.
    """
    user = await User.objects.filter(username=username).afirst()
    encoded = user.password if user is not None else None
    valid = await sync_to_async(_check_password, thread_sensitive=False)(password, encoded)
    if valid and user.is_active:
        return user
    return None


def _check_password(password: str, encoded: str | None) -> bool:
    if encoded is None:
        make_password(password)  # as long as a real check: no timing hint that a user exists
        return False
    return check_password(password, encoded)


class BearerAuth(HttpBearer):
    """Authorization: Bearer <token>; request.auth becomes an UncheckedToken, and the user once checked.

    The lookup waits for the request's hop to the database thread (as_user), so
    that checking the token costs no hop of its own.
    """

    async def authenticate(self, request, token: str):
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return UncheckedToken(token)
