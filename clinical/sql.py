"""Statements on the hot paths, run on the driver's connection beneath Django's.

For a short statement, Django's cursor wrapper and its `connection` proxy (an
asgiref Local lookup on every attribute) cost more than SQLite's own work:
measured here, a token lookup took 84 µs through `connection.cursor()` and
23 µs on the driver's connection. These helpers take this thread's
DatabaseWrapper once, write each statement's placeholders in the driver's
style once, and still turn driver errors into Django's (DatabaseError and its
kin, which the API answers as 503) and mark the connection for the check that
drops broken ones. Unlike Django's cursor, they are not seen by DEBUG's query
log, execute_wrapper() or tests that count queries.
"""

import uuid
from contextlib import contextmanager
from functools import cache

import orjson
from django.db import DEFAULT_DB_ALIAS, connections


def db():
    """This thread's DatabaseWrapper: pass it down instead of using the `connection` proxy."""
    return connections[DEFAULT_DB_ALIAS]


def execute(db, sql: str, params=()):
    """Run one statement written with %s placeholders; the driver's cursor, to fetch from."""
    cursor = _cursor(db)
    with db.wrap_database_errors:
        cursor.execute(_native(db.vendor, sql), params)
    return cursor


def executemany(db, sql: str, rows: list) -> None:
    cursor = _cursor(db)
    with db.wrap_database_errors:
        cursor.executemany(_native(db.vendor, sql), rows)


@contextmanager
def snapshot(db):
    """Statements that read one state of the database, outside Django's transactions.

    SQLite: a deferred transaction, which takes no lock (Django's begin IMMEDIATE,
    for writes). PostgreSQL reads each statement at its start in autocommit, as it
    would in a READ COMMITTED transaction: nothing to add there.
    """
    if db.vendor != "sqlite":
        yield
        return
    execute(db, "BEGIN DEFERRED")
    try:
        yield
    finally:
        execute(db, "COMMIT")


def _cursor(db):
    if db.connection is None:
        db.ensure_connection()
    if db.needs_rollback:
        db.validate_no_broken_transaction()  # raises, as Django's cursor would
    with db.wrap_database_errors:
        return db.connection.cursor()


@cache
def _native(vendor: str, sql: str) -> str:
    # Django's backends take %s; SQLite's driver takes ?. Our statements hold no literal %.
    return sql.replace("%s", "?") if vendor == "sqlite" else sql


def json_out(value):
    """A JSON column's value as fetched, ready for orjson: the engine's difference in one place.

    Django reads JSON columns as text on both engines. SQLite keeps the text
    Django wrote: it goes out as it is. PostgreSQL's jsonb keeps the value, not
    the text (1e308 comes back as 309 digits), so its text is read as the
    client's JSON was, and written out by orjson.
    """
    if not isinstance(value, (str, bytes)):
        return value  # a driver that decodes JSON itself
    return orjson.Fragment(value) if on_sqlite() else orjson.loads(value)


@cache
def on_sqlite() -> bool:
    """Whether the database is SQLite, asked once: `connections` looks up an asgiref Local on every use
    (py-spy, 80 % gets and 20 % creates: 2 % of the GIL's time, on the event loop)."""
    return db().vendor == "sqlite"


def uuid_text(value) -> str:
    """A UUID as the API and the audit chain write it: 36 lowercase characters.

    SQLite keeps 32 hex digits: sliced, as uuid.UUID would print them, at a tenth of its cost.
    """
    if isinstance(value, str) and len(value) == 32:
        value = value.lower()
        return f"{value[:8]}-{value[8:12]}-{value[12:16]}-{value[16:20]}-{value[20:]}"
    return str(value if isinstance(value, uuid.UUID) else uuid.UUID(hex=value))
