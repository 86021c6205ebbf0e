"""Threads that run the API's blocking database work for the event loop.

loop.run_in_executor() carries each call through a concurrent Future chained
to an asyncio one, with the executor's locks and semaphore on the way: 31 µs
of CPU a hop with 8 in flight, 93 µs with one (measured here, on this
machine's Python 3.11). A request hops once or twice, and on a core shared by
the event loop and the threads that CPU is taken from requests. Here a call is
one put on a SimpleQueue and one call_soon_threadsafe back: 13 and 37 µs.
"""

import asyncio
import logging
import queue
import threading

logger = logging.getLogger(__name__)


class Threads:
    """Up to `count` threads that run functions in arrival order.

    A thread is added only when a call finds none idle, as ThreadPoolExecutor
    does: a light load keeps one thread and its one connection, so after the
    database comes back (PostgreSQL restarted) one request meets the broken
    connection and drops it, not one a thread.
    """

    def __init__(self, count: int, name: str):
        self._count, self._name = count, name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = self._idle = 0

    async def run(self, function, /, *args):
        """function(*args) on one of the threads; its result, or its exception raised here."""
        future = asyncio.get_running_loop().create_future()
        self.start(_answering, future, function, args)
        return await future

    def start(self, function, /, *args) -> None:
        """function(*args) on one of the threads, not waited for: it reports back itself."""
        self._calls.put((function, args))
        with self._lock:
            if self._idle or self._threads == self._count:
                return
            self._threads += 1
            number = self._threads
        threading.Thread(target=self._serve, name=f"{self._name}-{number}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            function, args = self._calls.get()
            with self._lock:
                self._idle -= 1
            try:
                function(*args)
            except Exception:  # a function that reports back itself let an error out: the thread goes on
                logger.exception("%s failed on a database thread", function.__qualname__)


def _answering(future, function, args) -> None:
    try:
        result = function(*args)
    except BaseException as error:
        answer(future, error=error)
    else:
        answer(future, result)


def answer(future: asyncio.Future, result=None, *, error=None) -> None:
    """From a thread: settle an event loop's future with result, or error (a request gone meanwhile: nothing to do)."""
    try:
        future.get_loop().call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:
        pass  # the loop closed meanwhile: no one waits


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # cancelled meanwhile, or answered already
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
