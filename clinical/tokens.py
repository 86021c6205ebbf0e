"""Bearer tokens: issue, check and revoke; only a hash of each secret is kept."""

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import SESSION_KEY, get_user_model
from django.contrib.sessions.models import Session
from django.db import DatabaseError, transaction
from django.http import Http404, HttpResponse
from django.utils import timezone
from ninja.errors import AuthenticationError
from ninja.security import HttpBearer

from clinical import sql
from clinical.audit import Action, audit_record
from clinical.connections import on_db_thread
from clinical.models import Token
from clinical.passwords import ain_turn, password_matches
from clinical.responses import database_unavailable, json_response
from clinical.throttle import login_attempt_end, login_attempt_start, login_failure_record

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
    "(t.last_used_at IS NULL OR t.last_used_at < %s), u.password, t.password_stamp "
    f"FROM {Token._meta.db_table} t JOIN {User._meta.db_table} u ON u.id = t.user_id "
    "WHERE t.key_hash = %s AND t.revoked_at IS NULL AND t.expires_at > %s AND u.is_active = %s"
)
LAST_USED_SQL = f"UPDATE {Token._meta.db_table} SET last_used_at = %s WHERE id = %s"  # noqa: S608


def hash_token(raw: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def password_stamp(encoded_password: str) -> str:
    """What binds a token to the password it was issued under.

    A digest of the stored password hash (which holds its own salt): any change
    of password, by the API, the admin, `changepassword` or the shell, changes
    it, and the token check refuses every token issued before.
    """
    return hashlib.sha256(encoded_password.encode()).hexdigest()


class LoginRefused(Exception):
    """Wrong credentials (401), or too many failures lately (429 after `retry_after` seconds)."""

    def __init__(self, retry_after: int = 0):
        super().__init__(retry_after)
        self.retry_after = retry_after


async def alogin(*, username: str, password: str, ip: str | None) -> tuple[str, Token]:
    """Check the throttle, then the credentials; a new token, or LoginRefused. Every attempt is audited.

    The attempt is recorded before the password is checked (clinical.throttle),
    so concurrent attempts cannot all pass the throttle at once.
    """
    attempt_id, retry_after = await on_db_thread(login_attempt_start, username=username, ip=ip)
    if attempt_id is None:
        raise LoginRefused(retry_after)
    user = await auser_authenticate(username=username, password=password)
    if user is None:
        await on_db_thread(login_failure_record, attempt_id=attempt_id, username=username, ip=ip)
        raise LoginRefused
    return await on_db_thread(token_issue, user=user, ip=ip, attempt_id=attempt_id)


@transaction.atomic
def token_issue(*, user, ip: str | None = None, attempt_id: int | None = None) -> tuple[str, Token]:
    raw = secrets.token_urlsafe(32)
    now = timezone.now()
    token = Token.objects.create(
        user=user,
        key_hash=hash_token(raw),
        password_stamp=password_stamp(user.password),
        created_at=now,
        expires_at=now + settings.CLINICAL_TOKEN_TTL,
    )
    if attempt_id is not None:
        login_attempt_end(attempt_id, succeeded=True)
    audit_record(actor=user, action=Action.LOGIN, ip=ip)
    return raw, token


@transaction.atomic
def token_revoke(*, token_id: int, actor, ip: str | None = None) -> None:
    if Token.objects.filter(pk=token_id, revoked_at__isnull=True).update(revoked_at=timezone.now()):
        audit_record(actor=actor, action=Action.TOKEN_REVOKED, ip=ip)


def tokens_live(user) -> dict:
    """{"items"}: the user's tokens that still work, newest first; never their secret."""
    stamp = password_stamp(User.objects.values_list("password", flat=True).get(pk=user.pk))
    live = Token.objects.filter(
        user_id=user.pk, revoked_at__isnull=True, expires_at__gt=timezone.now(), password_stamp=stamp
    )
    fields = ("id", "created_at", "last_used_at", "expires_at")
    items = [{**row, "current": row["id"] == user.token_id} for row in live.order_by("-created_at").values(*fields)]
    return {"items": items}


@transaction.atomic
def token_revoke_own(user, *, token_id: int, ip: str | None = None) -> None:
    """Revoke one of the user's own tokens (a lost device); Http404 for anyone else's."""
    if not Token.objects.filter(pk=token_id, user_id=user.pk).exists():
        raise Http404
    token_revoke(token_id=token_id, actor=user, ip=ip)


@transaction.atomic
def tokens_revoke_all(*, user, actor, ip: str | None = None) -> int:
    """Sign a user out everywhere: every live token revoked (each audited), every admin session ended."""
    live = list(Token.objects.filter(user=user, revoked_at__isnull=True).values_list("pk", flat=True))
    for token_id in live:
        token_revoke(token_id=token_id, actor=actor, ip=ip)
    ended = [s.pk for s in Session.objects.iterator() if s.get_decoded().get(SESSION_KEY) == str(user.pk)]
    Session.objects.filter(pk__in=ended).delete()
    return len(live)


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
    return await as_user_on(on_db_thread, request, function, *args, **kwargs)


async def as_user_on(run, request, function, /, *args, **kwargs):
    """as_user(), run by `run` (on_db_thread, or connections.on_read_thread for a read)."""
    return await run(_as_user, request, function, args, kwargs)


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
    *user_values, token_id, last_used_stale, encoded_password, stamp_then = row
    if not hmac.compare_digest(password_stamp(encoded_password), stamp_then):
        return None  # the password changed since this token was issued
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
    valid = await ain_turn(password_matches, password, encoded)
    if valid and user.is_active:
        return user
    return None


class BearerAuth(HttpBearer):
    """Authorization: Bearer <token>; request.auth becomes an UncheckedToken, and the user once checked.

    The lookup waits for the request's hop to the database thread (as_user), so
    that checking the token costs no hop of its own.
    """

    async def authenticate(self, request, token: str):
        if not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return UncheckedToken(token)
