"""The REST API: mounts the routers, speaks JSON with orjson, maps errors in one place."""

import logging
from datetime import datetime

from django.db import DatabaseError, DataError, IntegrityError, NotSupportedError, ProgrammingError
from django.http import Http404
from ninja import NinjaAPI, Path, Schema, Status
from ninja.errors import AuthenticationError, HttpError, ValidationError
from ninja.parser import Parser
from ninja.renderers import BaseRenderer
from pydantic import Field, field_validator

from clinical.bodies import BadBody, parse_json
from clinical.conditional import tagged
from clinical.connections import on_db_thread
from clinical.health import areplication_state, database_state
from clinical.idempotency import IdempotencyError
from clinical.requests import client_ip
from clinical.responses import database_unavailable, json_response, to_json
from clinical.tokens import (
    BearerAuth,
    LoginRefused,
    alogin,
    as_user,
    token_revoke,
    token_revoke_own,
    tokens_live,
    unauthorized,
)
from recordings.api import router as recordings_router
from recordings.api import sync_router
from recordings.models import Recording
from recordings.schemas import no_nul, recording_data
from recordings.services import PreconditionFailed, RecordingConflict

logger = logging.getLogger(__name__)

NOT_FOUND = "Not found."
TOO_MANY_FAILURES = "Too many failed logins: wait for the time in Retry-After, then try again."
BAD_CREDENTIALS = "Wrong username or password, or the account is inactive."
MAX_ID = 2**63 - 1


class ORJSONParser(Parser):
    """Refuses what json.loads lets through: lone surrogates, invalid UTF-8, deep nesting (clinical.bodies)."""

    def parse_body(self, request):
        return parse_json(request.body)


class ORJSONRenderer(BaseRenderer):
    media_type = "application/json"

    def render(self, request, data, *, response_status):
        return to_json(data)


api = NinjaAPI(
    title="Clinical recordings",
    version="1",
    description="Recordings of clinicians' dictated notes, synced from the PWA.",
    auth=BearerAuth(),
    parser=ORJSONParser(),
    renderer=ORJSONRenderer(),
    urls_namespace="api",
)
api.add_router("/recordings", recordings_router)
api.add_router("/sync", sync_router)


class Credentials(Schema):
    username: str = Field(max_length=150)
    password: str = Field(max_length=4096)

    _no_nul = field_validator("username", "password")(no_nul)


class TokenOut(Schema):
    token: str
    expires_at: str


@api.get("/health", auth=None, tags=["platform"])
async def health(request):
    """Liveness and database readiness: 200, or 503 when the database is unusable; replication when configured.

    Replication lagging or down never changes the status: the database still serves.
    """
    state = await on_db_thread(database_state)
    status = 200 if state.pop("ready") else 503
    body = {"status": "ok" if status == 200 else "unavailable", **state}
    if (replication := await areplication_state()) is not None:
        body["replication"] = replication
    return api.create_response(request, body, status=status)


@api.post("/auth/token", auth=None, response={201: TokenOut}, tags=["auth"])
async def issue_token(request, credentials: Credentials):
    """Exchange a username and password for a bearer token."""
    try:
        raw, token = await alogin(username=credentials.username, password=credentials.password, ip=client_ip(request))
    except LoginRefused as refused:
        if not refused.retry_after:
            return _error(request, 401, BAD_CREDENTIALS)
        response = _error(request, 429, TOO_MANY_FAILURES)
        response["Retry-After"] = str(refused.retry_after)
        return response
    return Status(201, {"token": raw, "expires_at": token.expires_at.isoformat()})


@api.delete("/auth/token", response={204: None}, tags=["auth"])
async def revoke_token(request):
    """Revoke the token this request presents."""
    await as_user(request, _revoke_own, ip=client_ip(request))
    return Status(204, None)


def _revoke_own(user, *, ip: str | None) -> None:
    token_revoke(token_id=user.token_id, actor=user, ip=ip)


class TokenInfo(Schema):
    id: int
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime
    current: bool = Field(description="whether this is the token the request presents")


class TokenList(Schema):
    items: list[TokenInfo]


@api.get("/auth/tokens", response=TokenList, tags=["auth"])
async def list_tokens(request):
    """Your tokens that still work, newest first (never their secret): one per device you logged in on."""
    return json_response(await as_user(request, tokens_live))


@api.delete("/auth/tokens/{token_id}", response={204: None}, tags=["auth"])
async def revoke_one_token(request, token_id: int = Path(..., ge=1, le=MAX_ID)):
    """Revoke one of your tokens, such as a lost tablet's; 404 for a token that is not yours."""
    await as_user(request, token_revoke_own, token_id=token_id, ip=client_ip(request))
    return Status(204, None)


def _error(request, status: int, detail, extra: dict | None = None):
    response = api.create_response(request, {"detail": detail, **(extra or {})}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(AuthenticationError)
def token_refused(request, exc):
    return unauthorized()


@api.exception_handler(ValidationError)
def invalid(request, exc):
    # Only where and what: echoing the input back could be megabytes of transcript.
    errors = [{"loc": error["loc"], "msg": error["msg"], "type": error["type"]} for error in exc.errors]
    return _error(request, 422, errors)


@api.exception_handler(DatabaseError)
def database_error(request, exc):
    # Locked past the busy timeout, disk full, file gone or not a database: the
    # client should retry later. Errors in what we asked of it stay 500s.
    if isinstance(exc, (IntegrityError, DataError, ProgrammingError, NotSupportedError)):
        raise exc
    logger.exception("database unavailable")
    return database_unavailable()


@api.exception_handler(HttpError)
def http_error(request, exc):
    if isinstance(exc.__cause__, BadBody):
        return _error(request, 400, str(exc.__cause__))
    return _error(request, exc.status_code, str(exc))


@api.exception_handler(IdempotencyError)
def idempotency_refused(request, exc):
    return _error(request, 422, str(exc))


@api.exception_handler(Recording.DoesNotExist)
@api.exception_handler(Http404)
def not_found(request, exc):
    return _error(request, 404, NOT_FOUND)


@api.exception_handler(RecordingConflict)
def conflict(request, exc):
    return _refused(request, 409, exc)


@api.exception_handler(PreconditionFailed)
def precondition_failed(request, exc):
    return _refused(request, 412, exc)


def _refused(request, status: int, exc: RecordingConflict):
    if exc.recording is None:
        return _error(request, status, exc.detail)
    current = recording_data(exc.recording)
    # The current recording, at the top level and under "current", with its ETag.
    return tagged(_error(request, status, exc.detail, {**current, "current": current}), exc.recording.digest)
