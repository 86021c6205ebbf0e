"""Audited reads for the API: read on a reader thread, audit in a group commit.

Every read leaves its events, committed before the answer leaves the server.
Written one read at a time, each read is a write transaction, and reads take
turns on the write lock (SQLite's, across every process). Instead a read runs
on a reader thread without a write transaction, and its events wait for a
batch: while one batch commits, the events of the reads finished meanwhile
gather, and the next batch writes them all in one transaction. Each
read's answer is released when the batch holding its events has committed; a
batch that fails fails every read in it (503), none answered unaudited.

SQLite writes the events in the writes' batches (clinical.writes): one at a
time, on the database thread, in one transaction with the writes waiting
then. The reader thread queues a read's events there itself, with its answer:
the answer crosses back to the event loop once, when they are committed,
where handing the events over through the event loop took two crossings.
PostgreSQL writes up to CLINICAL_DB_THREADS batches of events at once
(below): it takes many writers, so batching saves commits there without
making one queue of all readers.
"""

import asyncio
from weakref import WeakKeyDictionary

from django.conf import settings
from django.db import transaction

from clinical import sql
from clinical.audit import events_write, read_events
from clinical.connections import checked, on_db_thread, on_read_thread, read_threads
from clinical.requests import client_ip
from clinical.threads import answer
from clinical.tokens import as_user_on
from clinical.writes import answer_once_committed


async def read_as_user(request, read, /, **kwargs):
    """read(user, **kwargs) -> (answer, ids of the recordings read) for the request's user; the answer once audited."""
    if sql.on_sqlite():
        return await as_user_on(_read_then_queue, request, _read, read, client_ip(request), kwargs)
    result, events = await as_user_on(on_read_thread, request, _read, read, client_ip(request), kwargs)
    if events:
        await group_commit(events)
    return result


async def _read_then_queue(function, /, *args):
    """SQLite: function(*args) -> (answer, events) on a reader thread, which queues the events itself."""
    answered = asyncio.get_running_loop().create_future()
    read_threads().start(_queue_events, answered, function, args)
    return await answered


def _queue_events(answered: asyncio.Future, function, args) -> None:
    try:
        result, events = checked(function, args, {})
        if events:
            answer_once_committed(events, answered, result)  # answered by the database thread
            return
    except BaseException as error:  # nothing leaves this thread unanswered
        answer(answered, error=error)
        return
    answer(answered, result)


def _read(user, read, ip, kwargs):
    with sql.snapshot(sql.db()):  # a page and its count of one state
        answer, read_ids = read(user, **kwargs)
    return answer, read_events(actor=user, recording_ids=read_ids, ip=ip)


class _Group:
    """One event loop's events waiting for a batch, and how many batches it is writing."""

    __slots__ = ("limit", "waiting", "writing")

    def __init__(self, limit: int):
        self.waiting: list[tuple[list, asyncio.Future]] = []
        self.writing = 0
        self.limit = limit


_groups: "WeakKeyDictionary[asyncio.AbstractEventLoop, _Group]" = WeakKeyDictionary()
_tasks: set[asyncio.Task] = set()  # batches being written, kept from the garbage collector


async def group_commit(events: list) -> None:
    """PostgreSQL: return once `events` (audit.read_events) are committed, with others waiting then."""
    loop = asyncio.get_running_loop()
    group = _groups.get(loop)
    if group is None:
        group = _groups[loop] = _Group(settings.CLINICAL_DB_THREADS)
    committed = loop.create_future()
    group.waiting.append((events, committed))
    if group.writing < group.limit:
        _start(loop, group)
    await committed


def _start(loop: asyncio.AbstractEventLoop, group: _Group) -> None:
    batch, group.waiting = group.waiting, []
    group.writing += 1
    task = loop.create_task(_write(loop, group, batch))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _write(loop, group: _Group, batch: list) -> None:
    try:
        await on_db_thread(_commit, [event for events, _ in batch for event in events])
    except Exception as error:
        for _, committed in batch:
            if not committed.done():  # a request cancelled meanwhile (its client went)
                committed.set_exception(error)
    else:
        for _, committed in batch:
            if not committed.done():
                committed.set_result(None)
    finally:
        group.writing -= 1
        if group.waiting:
            _start(loop, group)


def _commit(events: list) -> None:
    with transaction.atomic():
        events_write(events)
