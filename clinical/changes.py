"""The change sequence: one integer that orders every write for the sync feed."""

from django.db import connection, transaction

from clinical import sql
from recordings.models import Recording

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
    db = sql.db()
    if not db.in_atomic_block:
        raise RuntimeError("next_change_seq() must run inside the write transaction that uses it")
    return sql.execute(db, NEXT_SQL).fetchone()[0]


def sequence_high_water() -> int:
    """The highest change number handed out so far."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT COALESCE(MAX(value), 0) FROM clinical_changesequence")
        return cursor.fetchone()[0]


@transaction.atomic
def restart_above(high_water: int) -> int:
    """After a restore: give every recording a new change number above `high_water`, in the old order.

    Devices hold cursors up to `high_water`; renumbering makes each of them
    pull the restored state of every recording, and every later change
    numbers above what any device has seen. How many recordings moved.
    """
    table = Recording._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*), MIN(change_seq), MAX(change_seq) FROM {table}")  # noqa: S608
        count, lowest, highest = cursor.fetchone()
        top = max(high_water, sequence_high_water())
        if count:
            # Above every old number too, so that no row meets another's number on the way.
            base = max(top, highest) + 1
            cursor.execute(f"UPDATE {table} SET change_seq = change_seq + %s", [base - lowest])  # noqa: S608
            top = base + highest - lowest
        cursor.execute(
            "INSERT INTO clinical_changesequence (id, value) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET value = excluded.value",
            [top],
        )
    return count
