"""One streaming upstream request, read on a thread of its own so that the job's
thread can always stop it (used by openai.py).

Why a thread: the openai SDK yields only when a whole chunk has arrived. While an
upstream sends keep-alive comments (`: OPENROUTER PROCESSING`), trickles a chunk
byte by byte, or sends nothing after its headers, the SDK sits inside one read,
and each byte restarts its per-read timeout: a job reading it in its own thread
would never look at its cancel flag or deadline again. Here the job's thread waits
on a queue instead, checks `should_stop` every POLL_SECONDS, and to stop it shuts
the request's socket down. That ends the reading thread's blocked read at once
(a `close()` from another thread does not, on Linux) and the upstream sees the
disconnect, so it stops generating.

Two more bounds hold here, where the bytes are: the upstream must send a chunk at
least every `stall_seconds` (UPSTREAM_TIMEOUT; comments and a trickle do not
count), and at most `max_gap_bytes` between two chunks (one huge line, or a flood
of comments, would otherwise be buffered by the SDK without limit).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger(__name__)

#: How often the job's thread looks at `should_stop` while the upstream is quiet.
POLL_SECONDS = 0.1
#: Chunks read ahead of the job's thread (the reader waits past this).
READ_AHEAD = 64

_END = object()  # the upstream's stream ended


class UpstreamStalledError(Exception):
    """No chunk from the upstream for UPSTREAM_TIMEOUT: retried, as a timeout is."""


class UpstreamOversizeError(Exception):
    """The upstream sent more than a chunk may hold: not retried."""


class UpstreamReader:
    """Reads one upstream request (`open_stream()` returns the SDK's stream) on a
    daemon thread; `chunks()` hands its chunks to the job's thread."""

    def __init__(
        self,
        open_stream: Callable[[], Any],
        should_stop: Callable[[], bool],
        *,
        stall_seconds: float,
        max_gap_bytes: int,
        name: str = "upstream",
    ) -> None:
        self._open_stream = open_stream
        self._should_stop = should_stop
        self._stall_seconds = stall_seconds
        self._max_gap_bytes = max_gap_bytes
        self._items: queue.Queue[Any] = queue.Queue(READ_AHEAD)
        self._lock = threading.Lock()  # guards _stream, _abandoned, _finished
        self._stream: Any = None
        self._abandoned = False  # the job's thread stopped listening
        self._finished = False  # the reader is done with the socket (it may be reused)
        self._thread = threading.Thread(target=self._read, name=name, daemon=True)
        self._thread.start()

    # -- the job's thread ---------------------------------------------------------

    def chunks(self) -> Generator[Any]:
        """The SDK's chunks, as they come. Returns early once `should_stop()` is
        true; raises what the SDK raised, or UpstreamStalledError /
        UpstreamOversizeError. Closing it (or leaving it) stops the request."""
        last_chunk, bytes_then = time.monotonic(), 0
        try:
            while True:
                try:
                    item = self._items.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    if self._should_stop():
                        return
                    quiet = time.monotonic() - last_chunk
                    if quiet > self._stall_seconds:
                        raise UpstreamStalledError(
                            f"no chunk from the upstream for {quiet:.0f}s"
                        ) from None
                    if self._downloaded() - bytes_then > self._max_gap_bytes:
                        raise UpstreamOversizeError(
                            f"the upstream sent over {self._max_gap_bytes} bytes in no chunk"
                        ) from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                last_chunk, bytes_then = time.monotonic(), self._downloaded()
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop the request: the reader stops at once, the upstream sees the
        disconnect. (A stream read to its end is left alone: its connection may
        already serve another request.)"""
        with self._lock:
            self._abandoned = True
            if self._stream is not None and not self._finished:
                _shut_down(self._stream)

    def _downloaded(self) -> int:
        stream = self._stream
        response = getattr(stream, "response", None)
        return int(getattr(response, "num_bytes_downloaded", 0) or 0)

    # -- the reading thread -------------------------------------------------------

    def _read(self) -> None:
        try:
            stream = self._open_stream()
        except BaseException as exc:  # the job's thread raises it
            self._put(exc)
            return
        with self._lock:
            self._stream = stream
            abandoned = self._abandoned
        if abandoned:  # stopped while the upstream was still to answer
            self._finish(stream, shut=True)
            return
        end: object = _END
        try:
            for chunk in stream:
                if not self._put(chunk):
                    break
        except BaseException as exc:
            end = exc
        self._finish(stream, shut=False)
        self._put(end)

    def _finish(self, stream: Any, *, shut: bool) -> None:
        with self._lock:
            self._finished = True
            if shut:
                _shut_down(stream)
        try:
            stream.close()
        except Exception as exc:  # a socket already shut down may complain
            log.debug("closing an upstream stream: %s", type(exc).__name__)

    def _put(self, item: Any) -> bool:
        """Hand `item` to the job's thread; False once it stopped listening."""
        while True:
            if self._abandoned:
                return False
            try:
                self._items.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue


def _shut_down(stream: Any) -> None:
    """Shut the socket under an SDK stream (httpx's `network_stream` extension):
    a read blocked on it in another thread returns at once."""
    response = getattr(stream, "response", None)
    extensions = getattr(response, "extensions", None) or {}
    network = extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if isinstance(sock, socket.socket):
        try:
            # socket.socket's own method: ssl.SSLSocket's would drop its SSL object
            # under the reading thread.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
            return
        except OSError:
            return  # already closed
    try:  # no socket to reach (HTTP/2): closing is the best there is
        response.close() if response is not None else None
    except Exception as exc:
        log.debug("closing an upstream response: %s", type(exc).__name__)
