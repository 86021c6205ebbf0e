"""Idempotency-Key: a retried request replays the first answer instead of doing the work again.

The stored answer is written in the same transaction as the work, so a crash
can never leave work done without its answer (which would let a retry do it
twice). Only successful answers are stored: an error did no work, and the
client may fix the request and retry with the same key.
"""

import hashlib
import uuid
from collections.abc import Callable

import orjson
from django.conf import settings
from django.db import transaction
from django.http import HttpResponse
from django.utils import timezone

from clinical.audit import audit_reads
from clinical.models import IdempotencyKey
from clinical.requests import client_ip
from clinical.responses import to_json
from clinical.tokens import as_user

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
KEY_INVALID = f"The {HEADER} header must be 1 to {MAX_KEY_LENGTH} characters."
KEY_REUSED = f"This {HEADER} was used for a different request."


class IdempotencyError(Exception):
    """The key cannot be used for this request (422)."""


# Work: runs on the database thread, given the request's user; returns (status code, the answer's data or None).
Work = Callable[[object], tuple[int, object]]


async def aidempotent(request, work: Work):
    """Run `work` once per Idempotency-Key of this user; without the header, just run it."""
    key = request.headers.get(HEADER)
    if key is None:
        status, body = await as_user(request, _run, work)
        replayed = False
    else:
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise IdempotencyError(KEY_INVALID)
        status, body, replayed = await as_user(request, _run_once, key, fingerprint(request), work, client_ip(request))
    response = HttpResponse(body, status=status, content_type="application/json")
    if replayed:
        response[REPLAYED] = "true"
    return response


def fingerprint(request) -> str:
    """The request's method, path and body; the body as parsed JSON, so key order and spacing do not count."""
    digest = hashlib.sha256(f"{request.method}\0{request.path}\0".encode())
    try:
        digest.update(orjson.dumps(orjson.loads(request.body), option=orjson.OPT_SORT_KEYS))
    except orjson.JSONDecodeError:
        digest.update(request.body)  # empty (DELETE) or not JSON: the bytes themselves
    return digest.hexdigest()


def _run(user, work: Work) -> tuple[int, bytes]:
    status, data = work(user)
    return status, b"" if data is None else to_json(data)


def _run_once(user, key: str, fingerprint: str, work: Work, ip) -> tuple[int, bytes, bool]:
    with transaction.atomic():
        stored = _stored(user, key)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                raise IdempotencyError(KEY_REUSED)
            body = bytes(stored.body)
            if body:  # a recording delivered again is read again
                audit_reads(actor=user, recording_ids=[uuid.UUID(orjson.loads(body)["id"])], ip=ip)
            return stored.status_code, body, True
        status, body = _run(user, work)
        IdempotencyKey.objects.create(
            user=user, key=key, fingerprint=fingerprint, status_code=status, body=body, created_at=timezone.now()
        )
        return status, body, False


def _stored(user, key: str) -> IdempotencyKey | None:
    stored = IdempotencyKey.objects.filter(user=user, key=key).first()
    if stored is not None and stored.created_at < timezone.now() - settings.CLINICAL_IDEMPOTENCY_TTL:
        stored.delete()  # expired: the key is free again
        return None
    return stored


def idempotency_keys_purge() -> int:
    """Delete expired keys; how many went."""
    cutoff = timezone.now() - settings.CLINICAL_IDEMPOTENCY_TTL
    deleted, _ = IdempotencyKey.objects.filter(created_at__lt=cutoff).delete()
    return deleted
