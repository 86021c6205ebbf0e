"""uvicorn's HTTP protocol with deadlines for request headers and bodies, so that half-sent requests are closed.

uvicorn (0.54) reads a request's headers and body for as long as the client
cares to take: its --timeout-keep-alive only covers the wait for the first byte
of a request after a response. clinical/serve.py runs this class instead
(`--http clinical.protocol:TimedHttpToolsProtocol`).
"""

import logging
import math
import os
from dataclasses import dataclass, fields
from functools import cache

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("uvicorn.error")

# The defaults are for clinicians on poor mobile links uploading up to 2 MiB
# (the body limit, clinical/asgi.py). Headers are a few kB, one or two packets:
# 20 s leaves room for TCP's retransmissions (they back off 1, 2, 4, 8 s).
# A body must not pause for 30 s: a link that comes back after a ~10-15 s
# outage sends its next retransmission about 15-30 s after the last byte.
# The whole body must arrive within 120 s: 2 MiB at 50 kB/s takes 42 s, and
# 120 s still lets it through at 17 kB/s, while a trickle of a byte now and
# then holds a connection (and its buffered body) for two minutes at most.
# The PWA retries a cut upload with its Idempotency-Key.
VARIABLES = {
    "header": "CLINICAL_HEADER_TIMEOUT_SECONDS",
    "body_idle": "CLINICAL_BODY_IDLE_TIMEOUT_SECONDS",
    "body": "CLINICAL_BODY_TIMEOUT_SECONDS",
    "send": "CLINICAL_SEND_TIMEOUT_SECONDS",
}
TIMED_OUT = b"Request Timeout"


@dataclass(frozen=True)
class Timeouts:
    header: float = 20.0  # from the connection opening, or a request's first byte, to the end of its headers
    body_idle: float = 30.0  # the longest silence within a body while the server is reading it
    body: float = 120.0  # from the end of the headers to the end of the body
    # A client that stops reading its answer: an answer waiting to be sent is held
    # in memory (a feed page is up to 4 MiB), so the connection goes after this
    # long without the client taking any of it.
    send: float = 30.0


def timeouts_from(environ) -> Timeouts:
    """The Timeouts that VARIABLES set in environ; ValueError names a variable that is not a positive number."""
    values = {}
    for field in fields(Timeouts):
        name = VARIABLES[field.name]
        raw = environ.get(name, "").strip()
        if raw:
            values[field.name] = _seconds(name, raw)
    return Timeouts(**values)


def _seconds(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds, not {raw!r}.")
    return value


@cache
def configured_timeouts() -> Timeouts:
    """This process's Timeouts; each worker process reads the environment it inherited."""
    return timeouts_from(os.environ)


class ReadingFlow(FlowControl):
    """uvicorn's FlowControl, telling the protocol when the server stops and starts reading again."""

    def __init__(self, transport, protocol: "TimedHttpToolsProtocol") -> None:
        super().__init__(transport)
        self.protocol = protocol

    def pause_reading(self) -> None:
        super().pause_reading()
        self.protocol.reading_paused()

    def resume_reading(self) -> None:
        super().resume_reading()
        self.protocol.reading_resumed()


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that closes a connection whose request headers or body are late.

    Headers: within `header` seconds of the connection opening, or of the
    request's first byte on a kept-alive connection (--timeout-keep-alive covers
    the wait for that byte). Body: no `body_idle` seconds without a byte, and
    all of it within `body` seconds of the headers. While the server itself is
    not reading (the application has not asked for more, or has not yet let a
    client that expects 100-continue send), the clocks stop: the client is not
    the one late. A late request is answered 408 when nothing else is being
    answered on the connection; either way the connection is closed.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timeouts = configured_timeouts()
        self.awaiting: str | None = None  # "headers", "body", or None between requests
        self.request_begun = False  # a byte of the awaited request has arrived
        self.deadline = 0.0
        self.last_progress = 0.0
        self.held_since: float | None = None  # when the server stopped reading, if it has
        self.timer = None
        self.send_timer = None

    # What the client sends, through uvicorn's hooks

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.flow = ReadingFlow(transport, self)
        self.await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_awaiting()
        self.stop_send_timer()
        super().connection_lost(exc)

    # What the client reads, through the transport's write buffer

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.send_timer is None:
            self.send_timer = self.loop.call_later(self.timeouts.send, self.send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stop_send_timer()

    def stop_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def send_timed_out(self) -> None:
        self.send_timer = None
        logger.debug("Closing a connection: the client stopped reading its answer.")
        self.transport.abort()  # drops the unsent answer with it

    def data_received(self, data: bytes) -> None:
        if self.awaiting is None:  # even blank lines before a request count against its headers
            self.await_headers()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.awaiting != "headers":
            self.await_headers()
        self.request_begun = True

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.await_body()

    def on_body(self, body: bytes) -> None:
        self.last_progress = self.loop.time()
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.stop_awaiting()

    def handle_websocket_upgrade(self) -> None:
        self.stop_awaiting()
        super().handle_websocket_upgrade()

    # What the server reads, through ReadingFlow

    def reading_paused(self) -> None:
        if self.held_since is None:
            self.held_since = self.loop.time()

    def reading_resumed(self) -> None:
        if self.held_since is None:
            return
        now = self.loop.time()
        self.deadline += now - self.held_since
        self.last_progress = now
        self.held_since = None
        self.schedule()

    # The clocks

    def await_headers(self) -> None:
        self.start_awaiting("headers", self.timeouts.header, held=self.flow.read_paused)

    def await_body(self) -> None:
        held = self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue)
        self.start_awaiting("body", self.timeouts.body, held=held)

    def start_awaiting(self, what: str, timeout: float, *, held: bool) -> None:
        now = self.loop.time()
        self.awaiting = what
        self.request_begun = False
        self.deadline = now + timeout
        self.last_progress = now
        self.held_since = now if held else None
        self.schedule()

    def stop_awaiting(self) -> None:
        self.awaiting = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def due(self) -> float:
        if self.awaiting == "body":
            return min(self.deadline, self.last_progress + self.timeouts.body_idle)
        return self.deadline

    def schedule(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.awaiting is not None and self.held_since is None:
            self.timer = self.loop.call_at(self.due(), self.check)

    def check(self) -> None:
        self.timer = None
        if self.awaiting is None or self.held_since is not None:
            return  # reading_resumed schedules the next check
        if self.loop.time() < self.due():
            self.schedule()  # bytes came since this check was scheduled
            return
        self.time_out()

    def time_out(self) -> None:
        what = self.awaiting
        self.stop_awaiting()
        if self.transport.is_closing():
            return
        logger.debug("Closing a connection: the request's %s did not arrive in time.", what)
        if self.may_answer(what):
            self.send_408_response()
        self.transport.close()

    def may_answer(self, what: str) -> bool:
        """Whether a 408 would not land in the middle of another answer on this connection."""
        if self.pipeline:
            return False
        if what == "headers":  # self.cycle, if any, is the previous request's
            return self.request_begun and (self.cycle is None or self.cycle.response_complete)
        return self.cycle is not None and not self.cycle.response_started

    def send_408_response(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            # The application may be waiting for this body: it hears a disconnect now, and
            # whatever it sends goes nowhere.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        head = [STATUS_LINE[408]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % len(TIMED_OUT))
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + TIMED_OUT)
