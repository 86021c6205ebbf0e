"""The API's writes on SQLite, committed in groups: one transaction for the writes waiting together.

SQLite runs one write transaction at a time, on the database thread, and each
commit writes every page it touched to the WAL: for a create, the commit is
the largest part of SQLite's work. Writes that arrive while the database
thread is busy wait for it together; it then runs them all in one
transaction, where each write's own transaction becomes a savepoint, so one
refused (409, 404, a constraint) is undone alone and the others stand. Each
write's answer is released once the transaction that holds it has committed;
if the commit fails, every write in it fails (503) and none of them
happened. A write that finds the database thread idle runs alone, as before.

Reads' audit events (clinical.reads) wait in the same queue: a batch writes
all the events waiting in one statement, in the transaction of the writes
waiting with them, and each read is answered once that has committed. Apart,
a get's event waited behind the writes queued on the database thread and
then took a turn and a commit of its own (measured with 80 % gets and 20 %
creates, 2 workers: 7 % more requests a second together).

PostgreSQL takes many writers at once: each write is its own transaction on
one of the database threads.
"""

import asyncio
import threading

from django.db import connections, transaction

from clinical import sql
from clinical.audit import events_write
from clinical.connections import close_broken_connections, database_threads, on_db_thread
from clinical.threads import answer
from clinical.turns import write_turn


async def on_write_thread(function, /, *args, **kwargs):
    """on_db_thread for a write, which opens its own transaction (atomic), as the services do.

    On SQLite that transaction may be a savepoint in a batch's (see above).
    """
    if not sql.on_sqlite():
        return await on_db_thread(function, *args, **kwargs)
    written = asyncio.get_running_loop().create_future()
    _submit(_waiting, (lambda: function(*args, **kwargs), written))
    return await written


def answer_once_committed(events: list, answered: asyncio.Future, result) -> None:
    """From any thread: settle `answered` with `result` once a read's events (audit.read_events)
    are committed, with the others waiting then (SQLite)."""
    _submit(_events, (events, answered, result))


_lock = threading.Lock()
_waiting: list[tuple[object, asyncio.Future]] = []  # writes
_events: list[tuple[list, asyncio.Future, object]] = []  # reads' events, and their answers
_draining = False  # a run of _write_waiting is queued on the database thread


def _submit(queue: list, entry: tuple) -> None:
    global _draining
    with _lock:
        queue.append(entry)
        if _draining:
            return
        _draining = True
    database_threads().start(_write_waiting)


def _write_waiting() -> None:
    global _draining
    with _lock:
        # A request cancelled before its write began (the server stopping): the write is not made.
        batch = [(call, written) for call, written in _waiting if not written.cancelled()]
        reads = [entry for entry in _events if not entry[1].cancelled()]
        _waiting.clear()
        _events.clear()
        _draining = False
    try:
        with write_turn():
            if reads and not batch:
                _events_alone(reads)
            elif len(batch) == 1 and not reads:
                _alone(*batch[0])
            elif batch:
                _together(batch, reads)
    except Exception as error:  # the turn not taken, or not let go: answered, or none of the batch ran
        _fail(batch + reads, error)
    finally:
        close_broken_connections()


def _events_alone(reads: list) -> None:
    # One statement, a transaction of its own: BEGIN and COMMIT would each be
    # one more wait for the GIL with the write turn held.
    events_write([event for events, *_ in reads for event in events])
    for _, answered, result in reads:
        answer(answered, result)


def _alone(call, written: asyncio.Future) -> None:
    try:
        result = call()  # its own transaction, as every write's function opens one
    except Exception as error:
        answer(written, error=error)
    else:
        answer(written, result)


def _together(batch: list, reads: list) -> None:
    outcomes = [(answered, result, None) for _, answered, result in reads]
    try:
        with transaction.atomic():
            events_write([event for events, *_ in reads for event in events])  # failing, it fails the batch
            for call, written in batch:
                try:  # the write's own atomic() is a savepoint here: one refused is undone alone
                    outcomes.append((written, call(), None))
                except Exception as error:
                    if not _in_transaction():
                        raise  # SQLite rolled the whole transaction back (disk full, I/O error): none of it stands
                    outcomes.append((written, None, error))
    except Exception as error:  # begin, the reads' events or commit failed: none of the batch happened
        _fail(batch + reads, error)
        return
    for written, result, error in outcomes:
        if error is None:
            answer(written, result)
        else:
            answer(written, error=error)


def _fail(entries: list, error: Exception) -> None:
    for entry in entries:
        answer(entry[1], error=error)


def _in_transaction() -> bool:
    driver = connections["default"].connection
    return driver is not None and driver.in_transaction
