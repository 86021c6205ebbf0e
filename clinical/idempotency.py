"""Idempotency-Key: a retried request replays the first answer instead of doing the work again.

The stored answer is written in the same transaction as the work, so a crash
can never leave work done without its answer (which would let a retry do it
twice). Only successful answers are stored: an error did no work, and the
client may fix the request and retry with the same key.

Stored answers hold patient data, so they are bounded: deleting a recording
drops every stored answer that carries it (in the same transaction), and a
user's stored answers within the keys' lifetime take at most
CLINICAL_IDEMPOTENCY_MAX_BYTES_PER_USER; past that, an answer is kept as the
recording's id only, and its replay renders the recording as it is then.
"""

import hashlib
import uuid
from collections.abc import Callable

import orjson
from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.http import HttpResponse
from django.utils import timezone

from clinical.audit import audit_reads
from clinical.bodies import BadBody, parse_json
from clinical.conditional import IF_MATCH
from clinical.locks import serialise
from clinical.models import IdempotencyKey
from clinical.requests import client_ip
from clinical.responses import to_json
from clinical.tokens import as_user_on
from clinical.writes import on_write_thread

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEY_INVALID = f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} characters."
KEY_REUSED = f"This {HEADER} was used for a different request."


class IdempotencyError(Exception):
    """The key cannot be used for this request (422)."""


# Work: runs on the database thread, given the request's user; returns (status code, a recording's data or None).
Work = Callable[[object], tuple[int, dict | None]]
# Replay: on the database thread, replay(user, recording_id=…, ip=…) -> that recording's data as it is now,
# its read audited (recordings.selectors.recording_get).
Replay = Callable[..., dict]


async def aidempotent(request, work: Work, replay: Replay):
    """Run `work` once per Idempotency-Key of this user; without the header, just run it."""
    key = request.headers.get(HEADER)
    if key is None:
        status, body = await as_user_on(on_write_thread, request, _run, work)
        replayed = False
    else:
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise IdempotencyError(KEY_INVALID)
        status, body, replayed = await as_user_on(
            on_write_thread, request, _run_once, key, fingerprint(request), work, replay, client_ip(request)
        )
    response = HttpResponse(body, status=status, content_type="application/json")
    if replayed:
        response[REPLAYED] = "true"
    return response


def fingerprint(request) -> str:
    """The request's method, path and body, and its If-Match when it has one.

    The body as parsed JSON, so key order and spacing do not count. If-Match
    makes it another request (another precondition); without one, the
    fingerprint is what it was before If-Match counted, so stored keys still replay.
    """
    digest = hashlib.sha256(f"{request.method}\0{request.path}\0".encode())
    try:
        digest.update(orjson.dumps(parse_json(request.body), option=orjson.OPT_SORT_KEYS))
    except BadBody:
        digest.update(request.body)  # empty (DELETE), not JSON or too deep: the bytes themselves
    if_match = request.headers.get(IF_MATCH)
    if if_match is None:
        return digest.hexdigest()
    # Hashed again: an input (hex, then the header) that no request without If-Match hashes, whatever its body.
    return hashlib.sha256(f"{digest.hexdigest()}\0{IF_MATCH}\0{if_match}".encode()).hexdigest()


def _run(user, work: Work) -> tuple[int, bytes]:
    status, data = work(user)
    return status, b"" if data is None else to_json(data)


def _run_once(user, key: str, fingerprint: str, work: Work, replay: Replay, ip) -> tuple[int, bytes, bool]:
    with transaction.atomic():
        # The same key twice at once (two app servers on PostgreSQL): the second
        # waits for the first to commit, then replays its answer.
        serialise(f"idempotency:{user.pk}:{key}")
        stored = _stored(user, key)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                raise IdempotencyError(KEY_REUSED)
            return stored.status_code, _replayed(user, stored, replay, ip), True
        status, data = work(user)
        body = b"" if data is None else to_json(data)
        recording_id = None if data is None else data["id"]
        if body and _stored_bytes(user) + len(body) > settings.CLINICAL_IDEMPOTENCY_MAX_BYTES_PER_USER:
            body_kept = b""  # past the budget: the recording's id only
        else:
            body_kept = body
        IdempotencyKey.objects.create(
            user=user,
            key=key,
            fingerprint=fingerprint,
            status_code=status,
            body=body_kept,
            size=len(body_kept),
            recording_id=recording_id,
            created_at=timezone.now(),
        )
        return status, body, False


def _replayed(user, stored: IdempotencyKey, replay: Replay, ip) -> bytes:
    if stored.recording_id is None:
        return bytes(stored.body)
    if not stored.body:
        return to_json(replay(user, recording_id=stored.recording_id, ip=ip))
    audit_reads(actor=user, recording_ids=[stored.recording_id], ip=ip)  # delivered again: read again
    return bytes(stored.body)


def _stored_bytes(user) -> int:
    since = timezone.now() - settings.CLINICAL_IDEMPOTENCY_TTL
    return IdempotencyKey.objects.filter(user=user, created_at__gte=since).aggregate(total=Sum("size"))["total"] or 0


def _stored(user, key: str) -> IdempotencyKey | None:
    stored = IdempotencyKey.objects.filter(user=user, key=key).first()
    if stored is not None and stored.created_at < timezone.now() - settings.CLINICAL_IDEMPOTENCY_TTL:
        stored.delete()  # expired: the key is free again
        return None
    return stored


def idempotency_keys_drop(*, recording_id: uuid.UUID) -> None:
    """Forget the stored answers that carry this recording; in the transaction that deletes it."""
    IdempotencyKey.objects.filter(recording_id=recording_id).delete()


def idempotency_keys_purge() -> int:
    """Delete expired keys; how many went."""
    cutoff = timezone.now() - settings.CLINICAL_IDEMPOTENCY_TTL
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=cutoff).delete()
    return deleted
