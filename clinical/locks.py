"""Serialising writers on a key, inside the current transaction, on either engine."""

import hashlib

from clinical import sql


def serialise(*keys: str) -> None:
    """Hold a lock on each key until the current transaction ends.

    SQLite: nothing to do, since our write transactions begin IMMEDIATE and so
    hold the one write lock already. PostgreSQL: a transaction-scoped advisory
    lock per key, taken in a fixed order so that two transactions never wait
    on each other.
    """
    db = sql.db()
    if not db.in_atomic_block:
        raise RuntimeError("serialise() must run inside the transaction it protects")
    if db.vendor != "postgresql":
        return
    for key in sorted(set(keys)):
        sql.execute(db, "SELECT pg_advisory_xact_lock(%s)", [lock_id(key)])


def lock_id(key: str) -> int:
    # A signed 64-bit number from the key, as pg_advisory_xact_lock(bigint) takes.
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
