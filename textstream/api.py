"""The HTTP edge: the app factory, its lifespan, and the mapping of errors to statuses.

The app never runs a model. A request becomes a `CompletionJob` on the ModelQ queue
and a stream of events read back from Redis (routes.py, service.py). Long-lived
clients (the asyncio Redis pool, the ModelQ producer) are made in `lifespan` and
kept on `app.state.services`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from textstream import __version__
from textstream.config import Settings, get_settings
from textstream.events import JobEvents
from textstream.logs import RequestLog, configure_logging
from textstream.openai_api import router as openai_router
from textstream.ops import operator, public
from textstream.queue import JobQueue
from textstream.routes import router
from textstream.security import Guard, RateLimitedError, UnauthorizedError
from textstream.service import (
    InvalidInputError,
    JobNotFoundError,
    QueueFullError,
    QueueUnavailableError,
    Services,
)
from textstream.tokenizer import PromptTokens
from textstream.worker import EXTRA_EVENTS

log = logging.getLogger(__name__)


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, **extra}}


#: Our error types as OpenAI's `type` field names them.
OPENAI_TYPES = {
    "invalid_request": "invalid_request_error",
    "not_found": "invalid_request_error",
    "queue_full": "rate_limit_error",
    "queue_unavailable": "server_error",
}


def error_response(
    request: Request,
    status: int,
    error_type: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """Our error shape, or OpenAI's under /v1 (where invalid input is 400, not 422),
    so the `openai` SDK raises its usual exceptions with our message."""
    if request.url.path.startswith("/v1/"):
        body = {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(error_type, error_type),
                "param": field,
                "code": error_type,
            }
        }
        return JSONResponse(body, 400 if status == 422 else status, headers=headers)
    fields = {"field": field} if field is not None else {}
    return JSONResponse(error_body(error_type, message, **fields, **extra), status, headers=headers)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        # A blocked XREAD must not trip the read timeout: leave it room.
        socket_timeout=settings.read_block_ms / 1000 + settings.redis_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )
    jobs = JobEvents(
        client, ttl=settings.job_ttl, maxlen=settings.max_new_tokens_limit + EXTRA_EVENTS
    )
    prompt_tokens = PromptTokens()
    guard = Guard(settings, client)
    app.state.services = Services(
        settings, client, jobs, JobQueue(client, settings), prompt_tokens, guard
    )
    if not guard.enabled:
        log.warning("API_KEYS is empty: the API is open to anyone who can reach it")
    watcher = asyncio.create_task(prompt_tokens.watch(client, settings.worker_heartbeat_seconds))
    try:
        yield
    finally:
        watcher.cancel()
        await jobs.close()
        await client.close()


def add_error_handlers(app: FastAPI) -> None:
    """Domain errors become HTTP here, once (vLLM's build_app does the same)."""

    def handle(exc_type: type[Exception], status: int, error_type: str, **headers: str) -> None:
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            field = exc.field if isinstance(exc, InvalidInputError) else None
            message = str(exc)
            if isinstance(exc, JobNotFoundError):
                message = "no such job: unknown id, or its events expired (JOB_TTL)"
            return error_response(request, status, error_type, message, field, headers)

        app.add_exception_handler(exc_type, handler)

    handle(InvalidInputError, 422, "invalid_request")
    handle(JobNotFoundError, 404, "not_found")
    handle(QueueFullError, 429, "queue_full", **{"Retry-After": "2"})
    handle(QueueUnavailableError, 503, "queue_unavailable", **{"Retry-After": "2"})
    handle(UnauthorizedError, 401, "unauthorized", **{"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RateLimitedError)
    async def _limited(request: Request, exc: RateLimitedError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)}
        return error_response(request, 429, "rate_limited", str(exc), headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every error body has the same shape, routing errors (404, 405) included."""
        if isinstance(exc.detail, dict) and "error" in exc.detail:
            return JSONResponse(exc.detail, exc.status_code, headers=exc.headers)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, kind, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        field = ".".join(str(p) for p in errors[0]["loc"][1:]) if errors else ""
        message = errors[0]["msg"] if errors else "invalid request"
        detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in errors]
        return error_response(request, 422, "invalid_request", message, field, detail=detail)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(title="textstream", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    add_error_handlers(app)
    app.include_router(public)
    app.include_router(operator)
    app.include_router(router)
    app.include_router(openai_router)
    app.add_middleware(RequestLog)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["X-Job-Id", "X-Cache", "X-Request-Id"],
        )
    return app
