"""A recording's digest: SHA-256 over a canonical serialization of its id, content and version.

The canonical form (README, "Verifiable records") is one JSON array, written
by orjson without white space, of these values in this order:

    id, patient_ref, title, note_type, status, audio_path, duration_seconds,
    transcript, verification_results, error, recorded_at, version

- id: the UUID as 36 lowercase characters with hyphens.
- Text: as stored, no Unicode normalisation; JSON's own escapes only.
- Numbers: integers in full; a float with no fraction as the integer it is
  (100.0 is 100, as JavaScript reads it); other floats in their shortest
  round-trip form.
- verification_results: the JSON value with every object's keys sorted.
- recorded_at: UTC as YYYY-MM-DDTHH:MM:SS.ffffffZ (always 6 digits), or null.

The digest is the lowercase hex SHA-256 of those UTF-8 bytes.
"""

import hashlib
import uuid
from datetime import UTC, datetime

import orjson

from clinical import sql

FIELDS = (
    "id",
    "patient_ref",
    "title",
    "note_type",
    "status",
    "audio_path",
    "duration_seconds",
    "transcript",
    "verification_results",
    "error",
    "recorded_at",
    "version",
)
# Integral floats up to here are written as integers: every such float is one exactly.
_EXACT = 2**53


def digest(values) -> str:
    """The digest of a recording given as a sequence of FIELDS' values, as the model or the database holds them."""
    (rid, ref, title, note_type, status, audio, duration, transcript, results, error, recorded_at, version) = values
    canonical = [
        str(rid if isinstance(rid, uuid.UUID) else uuid.UUID(hex=rid)),
        ref,
        title,
        note_type,
        status,
        audio,
        _number(duration),
        transcript,
        _numbers(results),
        error,
        _moment(recorded_at),
        version,
    ]
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def recording_digest(recording) -> str:
    return digest([getattr(recording, name) for name in FIELDS])


def _number(value):
    if isinstance(value, float) and value.is_integer() and -_EXACT <= value <= _EXACT:
        return int(value)
    return value


def _numbers(value):
    if isinstance(value, dict):
        return {key: _numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item) for item in value]
    return _number(value)


def _moment(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)  # SQLite hands back UTC without a zone
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stored(db, *, batch: int = 5_000):
    """Every recording as stored, in id order, a batch at a time: lists of (id, digest stored, digest of its content).

    Keyset pages over the primary key: memory stays one batch whatever the
    table's size. The JSON column is read as its text and parsed as the API's
    input was, so the digest is the one written.
    """
    table = "recordings_recording"
    columns = ", ".join(FIELDS)
    first = f"SELECT {columns}, digest FROM {table} ORDER BY id LIMIT %s"  # noqa: S608
    rest = f"SELECT {columns}, digest FROM {table} WHERE id > %s ORDER BY id LIMIT %s"  # noqa: S608
    rows = sql.execute(db, first, [batch]).fetchall()
    while rows:
        yield [(row[0], row[-1], digest(_parsed(row[:-1]))) for row in rows]
        rows = sql.execute(db, rest, [rows[-1][0], batch]).fetchall()


def _parsed(row) -> list:
    values = list(row)
    results = FIELDS.index("verification_results")
    if isinstance(values[results], (str, bytes)):
        values[results] = orjson.loads(values[results])
    return values
