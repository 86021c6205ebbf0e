"""The change sequence: one integer that orders every write for the sync feed."""

from django.db import connection

# One statement: the row is created on first use and bumped atomically after.
NEXT_SQL = (
    "INSERT INTO clinical_changesequence (id, value) VALUES (1, 1) "
    "ON CONFLICT (id) DO UPDATE SET value = clinical_changesequence.value + 1 "
    "RETURNING value"
)


def next_change_seq() -> int:
    """Take the next number, inside the write transaction that uses it.

    Under SQLite's IMMEDIATE transactions only one writer runs at a time, so
    numbers are taken in commit order: no change can commit later with a
    number below one a client has already seen.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("next_change_seq() must run inside the write transaction that uses it")
    with connection.cursor() as cursor:
        cursor.execute(NEXT_SQL)
        return cursor.fetchone()[0]
