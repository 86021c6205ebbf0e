"""JSON answers rendered by orjson from data we built ourselves."""

import orjson
from django.http import HttpResponse

# SQLite hands back datetimes in UTC without a zone: render them as UTC.
JSON_OPTIONS = orjson.OPT_NAIVE_UTC
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
