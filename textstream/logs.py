"""Logging for the API and worker processes.

- Structured by default (LOG_FORMAT=json): one JSON object per line; fields given
  as `extra={"fields": {...}}` become top-level keys. LOG_FORMAT=text for humans.
- The API logs one line per request (RequestLog): id, method, route, status,
  duration, job id, caller (a key's hash, never the key).
- Prompt and completion text never reach the logs unless LOG_PROMPTS=true: code
  that would log them calls `redact()`, and paths that carry a prompt
  (`/completion/{question}`) are logged with the prompt replaced by its length,
  in our request lines and in uvicorn's access log alike.
- Replaces whatever handlers are installed (ModelQ calls `basicConfig` at import).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from typing import Any

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textstream.config import Settings
from textstream.metrics import count_request
from textstream.queue import quiet_modelq_logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

#: Paths whose remainder is the prompt itself.
PROMPT_PATH_PREFIXES = ("/completion/",)

_log_prompts = False


def redact_path(path: str) -> str:
    if _log_prompts:
        return path
    for prefix in PROMPT_PATH_PREFIXES:
        if path.startswith(prefix):
            return f"{prefix}<{len(path) - len(prefix)} chars>"
    return path


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", {})
        return line + "".join(f" {k}={v}" for k, v in fields.items())


class RedactPromptPaths(logging.Filter):
    """uvicorn's access log prints the request path, and in `/completion/{question}`
    the path is the prompt. Replace it with its length (the query string stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, sep, query = args[2].partition("?")
            record.args = (args[0], args[1], redact_path(path) + sep + query, args[3], args[4])
        return True


def configure_logging(settings: Settings) -> None:
    global _log_prompts
    _log_prompts = settings.log_prompts
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    quiet_modelq_logging()
    # Model downloads and weight loading print progress bars and chatter at INFO.
    for noisy in ("httpx", "huggingface_hub", "transformers", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    for old in [f for f in access.filters if isinstance(f, RedactPromptPaths)]:
        access.removeFilter(old)
    access.addFilter(RedactPromptPaths())


def redact(text: str, settings: Settings) -> str:
    """The text itself when LOG_PROMPTS=true, otherwise only its length."""
    return repr(text) if settings.log_prompts else f"<{len(text)} chars>"


class RequestLog:
    """ASGI middleware: one structured log line per HTTP request, and the request
    counted in the shared metrics (by route template, not raw path). A streaming
    response is logged when its stream ends, with the stream's duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("textstream.request")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, job_id = time.perf_counter(), 500, None
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode()[:64] or uuid.uuid4().hex

        async def sending(message: Message) -> None:
            nonlocal status, job_id
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers = dict(message.get("headers") or [])
                job_id = response_headers.get(b"x-job-id", b"").decode() or None
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
        self.log.info("request", extra={"fields": fields})
        services = getattr(scope.get("app"), "state", None)
        client = getattr(getattr(services, "services", None), "redis", None)
        if client is not None and route != "unmatched":
            with contextlib.suppress(RedisError, OSError):  # metrics never fail a request
                await count_request(client, scope["method"], route, status)
