"""ASGI entry point: the API on one database thread, behind a request-body limit.

Django wraps every request in its own ThreadSensitiveContext, which gives each
request a fresh thread for its sync code (the ORM included), and so a fresh
database connection. Here the API's sync code runs, in arrival order, on one
long-lived thread with one long-lived SQLite connection: SQLite takes one
writer at a time anyway, and a FIFO queue in front of it is fair, so no
request starves on the busy timeout. Several worker processes still share the
database safely through SQLite's own locking. The admin and the API's docs
keep Django's thread per request: nothing slow runs on the database thread.
"""

import gc
import os

import django
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import connections
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clinical.settings")
django.setup(set_prefix=False)

from clinical.chain import start_sealing  # noqa: E402
from clinical.connections import keep_connections_across_requests, on_db_thread  # noqa: E402
from clinical.middleware import API_PREFIX  # noqa: E402

API_DOCS = {f"{API_PREFIX}docs", f"{API_PREFIX}openapi.json"}
TOO_LARGE = b'{"detail": "The request body is larger than 2 MiB."}'
BAD_LENGTH = b'{"detail": "The Content-Length header is not a number."}'


class ClinicalASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        keep_connections_across_requests(debug=settings.DEBUG)
        start_sealing()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        # No ThreadSensitiveContext: thread-sensitive code runs on asgiref's
        # single long-lived thread.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send) -> None:
        path = scope["path"]
        if path.startswith(API_PREFIX) and path not in API_DOCS:
            await self.handle_api(scope, receive, send)
            return
        # The admin and the API's docs: their slow work (a password hash, a
        # large page) must never hold up the database thread, so their sync
        # code runs on a thread of the request's own, as Django does it, with
        # a connection opened for the request and closed after it.
        async with ThreadSensitiveContext():
            try:
                await super().handle(scope, receive, send)
            finally:
                await sync_to_async(connections.close_all)()

    async def handle_api(self, scope, receive, send) -> None:
        """Django's handle() for the API, leaner: no disconnect watcher, no thread hop to close.

        Django runs each view beside a task that listens for the client going
        away, to cancel the view. An API request's work runs on the database
        thread, where it cannot be cancelled: it completes either way, and the
        PWA retries with its Idempotency-Key. So the request simply runs to its
        end, without two tasks a request. Its response is plain JSON in memory:
        closing it (and the request_finished receivers) needs no thread, and the
        database thread's connection is checked after every call to it
        (on_db_thread). Otherwise as Django 5.2 does it.
        """
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        response = error_response if request is None else await self.run_get_response(request)
        try:
            await self.send_response(response, send)
        finally:
            response.close()
            body_file.close()

    async def lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Everything loaded so far lives as long as the process: move it
                # out of the collector's sight, so that full collections stay
                # short and do not stall requests (measured: p99 about halved).
                gc.collect()
                gc.freeze()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Close on the thread that owns the connection: a clean close
                # checkpoints the WAL.
                await on_db_thread(connections.close_all)
                await send({"type": "lifespan.shutdown.complete"})
                return


def limit_request_body(app, max_bytes: int):
    """Answer 413 to bodies over max_bytes before the application reads them."""

    async def limited(scope, receive, send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _answer(send, 400, BAD_LENGTH)
                return
            if int(declared) > max_bytes:
                await _answer(send, 413, TOO_LARGE)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_bytes:
                await _answer(send, 413, TOO_LARGE)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await app(scope, _replay(b"".join(chunks), receive), send)

    return limited


def _replay(body: bytes, receive):
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def _answer(send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


application = limit_request_body(ClinicalASGIHandler(), settings.CLINICAL_MAX_BODY_BYTES)
