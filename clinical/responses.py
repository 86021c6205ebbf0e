"""JSON answers rendered by orjson from data we built ourselves."""

import asyncio

import orjson
from django.http import HttpResponse

# SQLite hands back datetimes in UTC without a zone: render them as UTC.
JSON_OPTIONS = orjson.OPT_NAIVE_UTC
# An answer whose text takes more bytes of JSON than this is built and rendered
# in a worker thread; below it, the thread hop would cost more than the work.
LARGE_ANSWER_BYTES = 256 * 1024
DATABASE_UNAVAILABLE = "The database is unavailable right now; retry later."


def to_json(data) -> bytes:
    return orjson.dumps(data, option=JSON_OPTIONS)


def database_unavailable() -> HttpResponse:
    # Locked past the busy timeout, disk full, file gone: the PWA keeps the request and retries.
    response = json_response({"detail": DATABASE_UNAVAILABLE}, status=503)
    response["Retry-After"] = "5"
    return response


def json_response(data, status: int = 200) -> HttpResponse:
    """An answer that django-ninja passes through as it is.

    For data already shaped like the endpoint's response schema (our own rows
    and services' results): validating it again would cost more than the query.
    """
    return HttpResponse(to_json(data), status=status, content_type="application/json")


async def ajson_response(build, *, text: int) -> HttpResponse:
    """json_response(build()), built and rendered off the event loop when `text` says the answer is large.

    `text` is the bytes of JSON the answer's text will take. A large answer
    would hold the event loop, and so every other request, for as long as it
    takes to build and render; a small one is done on the loop, as json_response.
    """
    if text <= LARGE_ANSWER_BYTES:
        return json_response(build())
    return HttpResponse(await asyncio.to_thread(_render, build), content_type="application/json")


def _render(build) -> bytes:
    return to_json(build())
