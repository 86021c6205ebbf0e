"""Turns across the server's processes, taken in the kernel rather than by polling.

SQLite's write lock is taken by retrying: a writer that finds it held sleeps
(1, 2, 5 … up to 100 ms) and tries again, so with two processes a writer can
lose the race for it many times over (measured: 2 workers, 64 creates at
once, p99 18 times the median). Each process's database thread and sealer first
wait for a lock on a file beside the database (flock): the kernel wakes the
waiter the moment the holder lets go, so SQLite's lock is then free at once.
Nothing to do on PostgreSQL, which queues its own locks.

One process seals the audit chain at a time: the others skip their round
rather than hash the same events again.
"""

import fcntl
import os
import threading
from contextlib import contextmanager

from django.db import connections

from clinical import sql
from clinical.locks import lock_id

_files = threading.local()  # one open file a thread: flock does not exclude threads that share one


@contextmanager
def write_turn():
    """Hold this process's turn to write to the SQLite database (nothing on PostgreSQL)."""
    fd = _file("writers")
    if fd is None:
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


@contextmanager
def sealer_turn():
    """Whether this process may seal the audit chain now: False while another process seals."""
    fd = _file("sealer")
    if fd is None:
        yield from _pg_sealer_turn()
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        yield False
        return
    try:
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _pg_sealer_turn():
    # A session's advisory lock, let go at the end: sealing spans several transactions.
    db, key = sql.db(), lock_id("audit-chain-sealer")
    (mine,) = sql.execute(db, "SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
    try:
        yield mine
    finally:
        if mine:
            sql.execute(db, "SELECT pg_advisory_unlock(%s)", [key])


def _file(purpose: str) -> int | None:
    db = connections["default"]
    if db.vendor != "sqlite":
        return None
    path = f"{db.settings_dict['NAME']}-{purpose}"
    files = _files.__dict__
    if path not in files:
        files[path] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return files[path]
