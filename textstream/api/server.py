"""Serving the API process: uvicorn with the limits its command line cannot set.

`textstream api` (and `textstream serve`) run the app under uvicorn with:

- a bounded request head: uvicorn's httptools protocol accepts any amount of
  request line and headers (8 MB was seen to pass). `LimitedHttpTools` counts them
  as they are parsed and answers 431 past MAX_HEADER_BYTES, closing the connection;
- no uvicorn access log: the API logs one structured line per request itself
  (api/requestlog.py), with prompts and tokens redacted.

`uvicorn app:app` still works (Docker, or your own process manager), without the
head limit: put a proxy in front that bounds headers (nginx does by default).
"""

from __future__ import annotations

from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from textstream.config import Settings

STATUS_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"


class HeadTooLargeError(Exception):
    pass


class LimitedHttpTools(HttpToolsProtocol):  # type: ignore[misc]
    """uvicorn's httptools protocol, refusing request heads over `max_head` bytes."""

    max_head: ClassVar[int] = 16 << 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = 0

    def on_message_begin(self) -> None:
        self._head = 0
        super().on_message_begin()

    def _count(self, size: int) -> None:
        self._head += size
        if self._head > self.max_head:
            raise HeadTooLargeError

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
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

    def _send_431(self) -> None:
        body = b'{"error": {"type": "headers_too_large", "message": "request head too large"}}'
        head = [STATUS_431]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        self.transport.close()


def serve_api(settings: Settings, host: str, port: int) -> None:
    """Run one API process until SIGTERM/SIGINT (blocks). For more, run more (or
    replicas behind a load balancer): any API process serves any job's stream."""
    protocol = type("HttpProtocol", (LimitedHttpTools,), {"max_head": settings.max_header_bytes})
    uvicorn.run(
        "textstream.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        http=protocol,
        access_log=False,
        log_config=None,  # our logging (logs.configure_logging), not uvicorn's
        # Open streams end themselves on shutdown (transport/sse.py); this bounds
        # any other connection that does not.
        timeout_graceful_shutdown=5,
    )
