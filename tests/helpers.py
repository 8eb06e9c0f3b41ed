"""Test helpers: a timing SSE client. Launching the service's processes lives in
bench/cluster.py, which the benchmarks use too."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from bench import cluster
from bench.cluster import (
    REPO,
    Proc,
    SSEEvent,
    free_port,
    parse_sse_lines,
    start_api,
    start_workers,
    wait_for,
    wait_for_workers,
)
from textstream.transport.events import JobEvent, parse_entries

__all__ = [
    "REPO",
    "Proc",
    "SSEEvent",
    "SSEResponse",
    "completion_chunk",
    "free_port",
    "queued",
    "service_env",
    "serving",
    "start_api",
    "start_event_stream",
    "start_workers",
    "stored_events",
    "stream",
    "wait_for",
    "wait_for_workers",
]


def service_env(redis_url: str, model_id: str, **overrides: str) -> dict[str, str]:
    """bench.cluster.service_env with one torch thread per worker: the test processes
    and the services they start share 2 cores, where a worker's second thread only
    competes with another process (a test may still set TORCH_THREADS itself). A
    dropped /completion client's job waits 1 s for its return (not 20), so that tests
    of what a leaving client stops do not wait; tests/test_reconnect.py sets its own."""
    defaults = {"TORCH_THREADS": "1", "RECONNECT_GRACE_SECONDS": "1"}
    return cluster.service_env(redis_url, model_id, **{**defaults, **overrides})


@dataclass
class SSEResponse:
    status: int
    headers: httpx.Headers
    events: list[SSEEvent]
    body: str = ""

    def of(self, name: str) -> list[SSEEvent]:
        return [e for e in self.events if e.event == name]

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.of("token"))

    @property
    def last(self) -> SSEEvent:
        return self.events[-1]


def stored_events(client: Any, key: str | bytes) -> list[JobEvent]:
    """A job stream's events as its readers get them: a run of tokens stored in one
    entry (scripts.NewEvent) comes back as one event per token."""
    return parse_entries(client.xrange(key))


def stream(base: str, path: str, timeout: float = 60, **params: Any) -> SSEResponse:
    """GET an SSE endpoint and read it to the end, timing each event's arrival."""
    with httpx.stream("GET", base + path, params=params, timeout=timeout) as response:
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            return SSEResponse(response.status_code, response.headers, [], response.read().decode())
        events = parse_sse_lines(response.iter_lines())
        return SSEResponse(response.status_code, response.headers, events)


def queued(client: redis.Redis, name: str = "ml_tasks") -> int:
    """Size of ModelQ's `name` (its queue by default) over every model's queue."""
    total = 0
    for key in client.scan_iter(f"textstream:queue:*:{name}"):
        kind = client.type(key)
        total += int(client.llen(key) if kind == b"list" else client.scard(key))
    return total


@contextmanager
def serving(html: str) -> Iterator[str]:
    """A page of another origin, served from this machine (a page that Playwright
    fulfils counts as public, and Chromium keeps public pages off local servers)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def completion_chunk(text: str, finish: str | None = None, model: str = "hostile") -> bytes:
    """One SSE chunk of an OpenAI-compatible `/v1/completions` stream, as an upstream
    sends it."""
    choice = {"index": 0, "text": text, "finish_reason": finish}
    body = {"id": "x", "object": "text_completion", "created": 1, "model": model}
    return b"data: " + json.dumps({**body, "choices": [choice]}).encode() + b"\n\n"


def start_event_stream(handler: http.server.BaseHTTPRequestHandler) -> Any:
    """Answer a scripted upstream's request 200 as an SSE stream that ends with its
    connection; returns the stream's write."""
    handler.send_response(200)
    handler.send_header("content-type", "text/event-stream")
    handler.send_header("connection", "close")
    handler.end_headers()
    return handler.wfile.write
