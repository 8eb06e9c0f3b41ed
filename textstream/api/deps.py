"""What every route depends on: the long-lived services (made in the lifespan, kept
on `app.state`) and who is calling (`authorize`, a FastAPI dependency)."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field, replace

import redis.asyncio as aioredis
from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from textstream.api.context_window import PromptTokens
from textstream.api.errors import (
    BadHeaderError,
    InvalidInputError,
    RateLimitedError,
    UnauthorizedError,
    error_response,
)
from textstream.api.limits import undecodable
from textstream.api.queue import JobQueue
from textstream.api.queue_watch import QueueWatch
from textstream.api.relay.job_events import JobEvents
from textstream.api.security import Caller, Guard
from textstream.config import Settings
from textstream.connections import UNREACHABLE
from textstream.job import MAX_QUEUE_TIMEOUT
from textstream.registry import LiveModels


@dataclass
class Services:
    """Long-lived clients, made in the app's lifespan and kept on `app.state`."""

    settings: Settings
    redis: aioredis.Redis
    jobs: JobEvents
    queue: JobQueue
    prompt_tokens: PromptTokens
    guard: Guard
    #: Bounds the submissions in hand at once (MAX_SUBMITTING): see submit.submission_turn.
    submitting: asyncio.Semaphore
    #: The models live workers serve, as submissions resolve theirs (re-read each second).
    live_models: LiveModels = field(default_factory=LiveModels)
    #: Queue positions and live workers for queued jobs' readers (read once for all).
    queue_watch: QueueWatch = field(default_factory=QueueWatch)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def identify(guard: Guard, request: Request, job_id: str = "", token: str = "") -> Caller:
    """The caller by its Authorization header (or a job's stream token) and address;
    raises UnauthorizedError."""
    client_ip = request.client.host if request.client else "unknown"
    return guard.identify(request.headers.get("authorization"), client_ip, job_id, token)


async def authorize(request: Request) -> Caller:
    """Who is calling (API key, or per-job stream token on an events URL), and
    count the call against its rate limit. Raises for 401 / 429.

    A request refused after this point (404, 409, 422, 429, 503) takes its count
    back: errors.py calls `request.state.refund`. Refusals write nothing."""
    services = services_of(request)
    guard: Guard = services.guard
    job_id = request.path_params.get("job_id", "") if request.url.path.endswith("/events") else ""
    caller = identify(guard, request, job_id, request.query_params.get("access_token", ""))
    try:
        request.state.refund = await guard.count_request(caller)
    except RateLimitedError:  # a 429 for the rate carries them too
        await rate_headers(services, request, caller)
        raise
    await rate_headers(services, request, caller)
    caller = replace(caller, queue_timeout=queue_timeout_header(request))
    request.state.caller = caller
    part = undecodable(request.scope)
    if part is not None:  # the server decoded it with U+FFFD in place of its bytes
        raise InvalidInputError(part, f"{part} must be valid UTF-8 once percent-decoded")
    return caller


async def rate_headers(services: Services, request: Request, caller: Caller) -> None:
    """OpenAI's x-ratelimit-* headers for this caller's minute, when RATE_LIMIT or
    TOKEN_RATE_LIMIT is on (headers.SecurityHeaders adds them to the answer). Tokens
    remaining are before this request's own reservation."""
    settings = services.settings
    if not (settings.rate_limit or settings.token_rate_limit):
        return
    try:
        used = await services.guard.usage(caller)
    except UNREACHABLE:
        return  # the request itself says what Redis trouble means
    reset = f"{math.ceil(used.reset_seconds)}s"
    headers: dict[str, str] = {}
    for kind, limit, count in (
        ("requests", settings.rate_limit, used.requests),
        ("tokens", settings.token_rate_limit, used.tokens),
    ):
        if limit:
            headers[f"x-ratelimit-limit-{kind}"] = str(limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - count))
            headers[f"x-ratelimit-reset-{kind}"] = reset
    request.state.ratelimit_headers = headers


def queue_timeout_header(request: Request) -> float | None:
    """`X-Queue-Timeout: <seconds>`: how long the request will wait for a worker."""
    value = request.headers.get("x-queue-timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_QUEUE_TIMEOUT:  # NaN and inf fail this too
        raise BadHeaderError(
            "X-Queue-Timeout", f"X-Queue-Timeout must be seconds in (0, {MAX_QUEUE_TIMEOUT:g}]"
        )
    return seconds


def tenant_of(services: Services, caller: Caller) -> str:
    """Whose a new job is: the caller's identity when API keys are on. An open API
    has no tenants ("" reads as everyone's)."""
    return caller.identity if services.guard.enabled else ""


class KeyBeforeBody:
    """Refuses a request with a body (every POST route needs the key) whose key is
    missing or wrong before reading that body: `authorize` runs after FastAPI has
    read and parsed it, so without this a caller with no key could hold a
    connection by never finishing its body, and have the API read a megabyte.
    A valid key passes on to the route, which counts it (`authorize`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services | None = None
        if scope["type"] == "http" and scope["method"] == "POST":
            services = getattr(scope["app"].state, "services", None)
        if services is not None and services.guard.enabled:  # an open API has no key
            request = Request(scope)
            try:
                identify(services.guard, request)  # a POST takes no stream token
            except UnauthorizedError as refusal:
                headers = dict(refusal.headers)
                if request.headers.get("content-length", "0") != "0" or (
                    "transfer-encoding" in request.headers
                ):
                    # A body follows that nobody will read: the connection ends with
                    # this answer (as BodyLimit's 413), or the client could send any
                    # amount for the server to skip, and a body held back after
                    # `Expect: 100-continue` would be read as the next request.
                    headers["Connection"] = "close"
                response = error_response(
                    request, refusal.status, refusal.error_type, str(refusal), None, headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
