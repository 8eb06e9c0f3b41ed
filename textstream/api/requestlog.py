"""One structured log line per HTTP request, and the request counted in the shared
metrics (by route template, not raw path). A streaming response is logged when its
stream ends, with the stream's duration. The prompt in `/completion/{question}`
is logged as its length unless LOG_PROMPTS=true (logs.redact_path).

A client's `X-Request-Id` is kept (and echoed back) only when it looks like an id:
1-64 characters of [A-Za-z0-9._:-]. Anything else (non-UTF-8 bytes, 10 KB of
text, newlines that would forge log lines) is replaced by a fresh id."""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textstream.api.limits import READ_TIMED_OUT
from textstream.api.metrics import RequestCounts
from textstream.connections import UNREACHABLE
from textstream.logs import redact_path

PROBES = frozenset({"/health", "/ready", "/metrics"})
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")


def request_id_of(headers: dict[bytes, bytes]) -> str:
    given = headers.get(b"x-request-id", b"")
    return given.decode("ascii") if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


class RequestLog:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("textstream.request")
        self.counts = RequestCounts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, job_id = time.perf_counter(), 500, None
        headers = dict(scope.get("headers") or [])
        request_id = request_id_of(headers)

        async def sending(message: Message) -> None:
            nonlocal status, job_id
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = dict(message.get("headers") or [])
                job_id = response_headers.get(b"x-job-id", b"").decode("latin-1") or None
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            await self._finish(scope, request_id, status, job_id, started)

    async def _finish(
        self, scope: Scope, request_id: str, status: int, job_id: str | None, started: float
    ) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        status = 408 if scope.get(READ_TIMED_OUT) else status
        caller = getattr(scope.get("state", {}).get("caller"), "identity", None)
        fields = {
            "request_id": request_id,
            "method": scope["method"],
            "route": route,
            "path": redact_path(scope["path"]),
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            "job_id": job_id,
            "caller": caller,
        }
        # Load balancers probe these every few seconds: not worth an INFO line each.
        level = logging.DEBUG if route in PROBES and status < 400 else logging.INFO
        self.log.log(level, "request", extra={"fields": fields})
        services = getattr(scope.get("app"), "state", None)
        client = getattr(getattr(services, "services", None), "redis", None)
        if client is not None and route != "unmatched":
            with contextlib.suppress(*UNREACHABLE):  # metrics never fail a request
                await self.counts.add(client, scope["method"], route, status)
