"""Keep the database thread's connection across requests; drop it only when broken.

Django closes connections at every request's start and end because, under ASGI,
each request's sync code may run in a thread of its own. Our ASGI handler runs
all sync code on one long-lived thread, so its one connection is worth keeping:
opening a connection and setting its pragmas on every request costs more than
the request's own queries.
"""

import threading
from functools import cache

from django.conf import settings
from django.core import signals
from django.db import close_old_connections, connections, reset_queries

from clinical.threads import Threads
from clinical.turns import write_turn


def close_broken_connections() -> None:
    """Django's close_if_unusable_or_obsolete, without the age limit."""
    for conn in connections.all(initialized_only=True):
        if conn.connection is None:
            continue
        if conn.get_autocommit() != conn.settings_dict["AUTOCOMMIT"]:
            conn.close()
        elif conn.errors_occurred:
            if conn.is_usable():
                conn.errors_occurred = False
            else:
                conn.close()


def keep_connections_across_requests(debug: bool) -> None:
    signals.request_started.disconnect(close_old_connections)
    # Not replaced by close_broken_connections: the API's threads check their
    # connection after every call, the admin closes its own after each request,
    # and on the event loop, where an API request ends, there is none to check.
    signals.request_finished.disconnect(close_old_connections)
    if not debug:
        # Only DEBUG logs queries; the receiver would cost a thread hop a request.
        signals.request_started.disconnect(reset_queries)


async def on_db_thread(function, /, *args, **kwargs):
    """Run `function` on a database thread, then drop its connection if that broke it.

    This is sync_to_async without its per-call context bookkeeping, which our
    sync functions do not need (measured: 86 against 138 µs of CPU a call),
    nor an executor's futures (clinical.threads).
    """
    return await database_threads().run(_in_turn, function, args, kwargs)


async def on_read_thread(function, /, *args, **kwargs):
    """on_db_thread for a read: on a reader thread, outside the writers' turn (its events: clinical.reads)."""
    return await read_threads().run(checked, function, args, kwargs)


_making = threading.Lock()


def database_threads() -> Threads:
    """Where the API's database work runs, each thread keeping its one connection.

    SQLite: one thread, since SQLite takes one writer at a time and a FIFO in
    front of it is fair. PostgreSQL runs many transactions at once: a fixed set
    of CLINICAL_DB_THREADS threads, each with one connection from the pool, and
    no thread made per request.
    """
    with _making:  # reader threads may ask first, several at once (clinical.reads): still one set
        return _database_threads()


@cache
def _database_threads() -> Threads:
    return Threads(settings.CLINICAL_DB_THREADS, "database")  # 1 on SQLite


@cache
def read_threads() -> Threads:
    """Where the API's reads run. SQLite: CLINICAL_READ_THREADS threads of their own,
    each with its own connection; in WAL, readers neither wait for the writer nor
    hold it up. PostgreSQL: the database threads, which run many transactions at once.
    """
    if connections["default"].vendor == "sqlite":
        return Threads(settings.CLINICAL_READ_THREADS, "reader")
    return database_threads()


def _in_turn(function, args, kwargs):
    with write_turn():
        return checked(function, args, kwargs)


def checked(function, args, kwargs):
    """function(*args, **kwargs) on a database or reader thread, its connection dropped after if that broke it."""
    try:
        return function(*args, **kwargs)
    finally:
        close_broken_connections()
