"""Serving the API process: uvicorn with the limits its command line cannot set.

`textstream api` (and `textstream serve`) run the app under uvicorn with:

Each works around uvicorn 0.34's httptools protocol (`LimitedHttpTools`, `Http10Cycle`
subclass it, so an upgrade of uvicorn must be checked against them):

- a bounded request head: uvicorn's httptools protocol accepts any amount of
  request line and headers (8 MB was seen to pass). `LimitedHttpTools` counts them
  as they are parsed and answers 431 past MAX_HEADER_BYTES, closing the connection;
- a bounded time to send a request: uvicorn times out only an idle connection after
  a response, so one that sends nothing, or half a head, or a body shorter than its
  Content-Length, was held for ever (600 such sockets from one client were all
  still open after a minute). A request must arrive whole within
  REQUEST_READ_SECONDS; past that it gets 408 and the connection closes;
- HTTP/1.0 streams without chunked encoding: uvicorn chunks every response without
  a Content-Length whatever the request's version, and an HTTP/1.0 client (which
  knows no chunks) then reads chunk sizes inside the SSE. Such a response is sent
  as it is and ended by closing the connection (RFC 9112 §6.3);
- no uvicorn access log: the API logs one structured line per request itself
  (api/requestlog.py), with prompts and tokens redacted.

`uvicorn app:app` still works (Docker, or your own process manager), without the
head limit: put a proxy in front that bounds headers (nginx does by default).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar, cast

import httptools
import uvicorn
from uvicorn._types import ASGISendEvent
from uvicorn.main import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from textstream.api.errors import refusal_body
from textstream.api.limits import READ_TIMED_OUT
from textstream.api.relay.sse import STOPPING
from textstream.config import Settings

STATUS_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
STATUS_408 = b"HTTP/1.1 408 Request Timeout\r\n"
#: (error type, message) of the two refusals the server writes itself, before or
#: without the app; their bodies take the route's shape (errors.refusal_body).
REFUSAL_431 = ("headers_too_large", "request head too large")
REFUSAL_408 = ("request_timeout", "the request did not arrive whole within REQUEST_READ_SECONDS")


class HeadTooLargeError(Exception):
    pass


class LimitedHttpTools(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol, refusing request heads over `max_head` bytes
    and requests that take over `read_seconds` to arrive.

    The read clock runs only while the connection waits on the client: from the
    connection's start, or the first byte of a request when no answer is being
    sent, or the end of the last answer when a request began arriving during it,
    to that request's last byte. It never runs while an answer is being sent
    (a pipelined request's time is the client's only once the answers before it
    are done), and never cuts one."""

    max_head: ClassVar[int] = 16 << 10
    #: How long a request (line, headers and body) may take to arrive.
    read_seconds: ClassVar[float] = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = 0
        #: The request target's first bytes (an error body's shape follows the path).
        self._target = b""
        self._read_timer: asyncio.TimerHandle | None = None
        self._reading = False  # between a request's first byte and its last
        #: The cycle of the request being read, once its head is in (None before).
        self._read_cycle: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_read_timer()  # a connection that never sends a byte is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def _answering(self) -> bool:
        """An answer is being sent, or requests wait for their turn to be answered.
        (The request being read, once its turn has come, waits on the client.)"""
        if self.pipeline:
            return True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return False
        return cycle is not self._read_cycle or cycle.response_started

    def on_message_begin(self) -> None:
        self._head = 0
        self._target = b""
        self._reading = True
        self._read_cycle = None
        if self._answering():
            self._cancel_read_timer()  # timed from the end of the answers before it
        else:
            self._arm_read_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._read_cycle = self.cycle
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            self.cycle.__class__ = Http10Cycle  # before its task first runs

    def on_message_complete(self) -> None:
        self._reading = False
        self._read_cycle = None
        self._cancel_read_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._reading and not self._answering() and not self.transport.is_closing():
            self._arm_read_timer()  # the next request began arriving during that answer

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_seconds, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        """The client did not send a whole request in time. Unless that request was
        already answered (a 401 or 413 before its body), it gets a 408; then the
        connection closes. The app, if it was waiting for the body, reads a
        disconnect. An answer being sent is never cut: the clock starts again."""
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self._read_cycle
        if cycle is not None and cycle.response_started and not cycle.response_complete:
            self._arm_read_timer()
            return
        if self._answering() and cycle is None:  # (the clock is not armed so; should
            self._arm_read_timer()  # it be, a pipelined request waits its turn)
            return
        if cycle is None or not cycle.response_started:
            self._write_refusal(STATUS_408, REFUSAL_408)
        if cycle is not None and not cycle.response_complete:
            cycle.scope[READ_TIMED_OUT] = True  # type: ignore[literal-required]
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _count(self, size: int) -> None:
        self._head += size
        if self._head > self.max_head:
            raise HeadTooLargeError

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        if len(self._target) < 8:
            self._target += url[:8]
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def data_received(self, data: bytes) -> None:
        """uvicorn's own, with a 431 for an oversized head (an exception raised in a
        parser callback reaches here as an HttpParserError)."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._head > self.max_head:
                self._send_431()
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        # uvicorn stopped its idle timer for these bytes; if they began no request
        # (blank lines between requests) or ended the body of one already answered,
        # nothing would time the connection again.
        idle = self._read_timer is None and self.timeout_keep_alive_task is None
        if idle and not self._answering() and not self.transport.is_closing():
            self._arm_read_timer()

    def _send_431(self) -> None:
        self._cancel_read_timer()
        self._write_refusal(STATUS_431, REFUSAL_431)
        self.transport.close()

    def _write_refusal(self, status_line: bytes, refusal: tuple[str, str]) -> None:
        body = refusal_body(self._target.decode("latin-1"), *refusal)
        head = [status_line]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))


class Http10Cycle(RequestResponseCycle):  # type: ignore[misc]
    """An HTTP/1.0 request's cycle: a response without a Content-Length (a stream)
    is sent unchunked and ended by closing the connection, as HTTP/1.0 frames it.
    Responses with a length go through uvicorn unchanged."""

    close_delimited = False

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            headers = list(message.get("headers", []))
            names = {name.lower() for name, _ in headers}
            if b"content-length" not in names and self.scope["method"] != "HEAD":
                self.close_delimited = True
                self.chunked_encoding = False  # uvicorn adds no chunked header
                headers = [(n, v) for n, v in headers if n.lower() != b"connection"]
                message = cast(
                    ASGISendEvent, {**message, "headers": [*headers, (b"connection", b"close")]}
                )
        elif message["type"] == "http.response.body" and self.close_delimited:
            await self._send_unframed(message.get("body", b""), message.get("more_body", False))
            return
        await super().send(message)

    async def _send_unframed(self, body: bytes, more_body: bool) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        if body:
            self.transport.write(body)
        if not more_body:
            self.response_complete = True
            self.message_event.set()
            self.transport.close()  # the end of the body, to an HTTP/1.0 client
            self.on_response()


#: A stop signal's handler: (signal number, frame).
SignalHandler = Callable[[int, FrameType | None], object]


class SignalForwardingServer(uvicorn.Server):
    """uvicorn's server for `textstream serve`, which decides what each Ctrl-C does.

    uvicorn force-exits on a second SIGINT, skipping the app's lifespan shutdown
    and logging its CancelledError as a traceback; and it raises every signal again
    once it returns. Here every signal starts the (graceful, bounded: open streams
    end themselves, others get timeout_graceful_shutdown) shutdown and goes, at
    once and only once, to `on_signal`, which stops the rest. Setting STOPPING
    stops it too."""

    def __init__(self, config: uvicorn.Config, on_signal: SignalHandler) -> None:
        super().__init__(config)
        self.on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.should_exit = True
        self.on_signal(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """Stop also when `serve` stops for a reason of its own (its workers could
        not start), or got a signal before this server listened for them."""
        return STOPPING.is_set() or await super().on_tick(counter)


def serve_api(
    settings: Settings, host: str, port: int, on_signal: SignalHandler | None = None
) -> None:
    """Run one API process until SIGTERM/SIGINT (blocks). For more, run more (or
    replicas behind a load balancer): any API process serves any job's stream.
    `on_signal`: `textstream serve`'s handler, given every stop signal
    (SignalForwardingServer)."""
    limits = {"max_head": settings.max_header_bytes, "read_seconds": settings.request_read_seconds}
    protocol = type("HttpProtocol", (LimitedHttpTools,), limits)
    config = uvicorn.Config(
        "textstream.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        http=protocol,
        access_log=False,
        log_config=None,  # our logging (logs.configure_logging), not uvicorn's
        # Open streams end themselves on shutdown (relay/sse.py); this bounds
        # any other connection that does not.
        timeout_graceful_shutdown=5,
    )
    if on_signal is None:
        server = uvicorn.Server(config)
    else:
        server = SignalForwardingServer(config, on_signal)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run: the port is taken, the app failed
