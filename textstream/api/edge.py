"""The caller's edge: one ASGI middleware settles who is calling, before anything
reads the request's body, and answers every refusal of the caller itself.

For a route that needs a caller (its dependencies hold `authorize`), `CallerEdge`:
- identifies the caller: an API key (Authorization: Bearer), or on an events URL
  a job's stream token (`access_token`), or, with no keys set, its address (401);
- counts the request against RATE_LIMIT (429), and notes OpenAI's x-ratelimit-*
  headers for the answer (headers.SecurityHeaders adds them);
- reads X-Queue-Timeout (400) and refuses a path or query that is not UTF-8 once
  percent-decoded (limits.undecodable);
and answers a refusal at once, in the route's shape (OpenAI's under /v1), closing
the connection when a body follows that nobody will read. A request refused
later (404, 409, 422, 429, 503) takes its rate count back (errors.refund).

Everything else that bounds a request is answered before it reaches a route too,
in the same shape (errors.refusal_body): its head and its pace by the server
(server.py: 431, 408), its body by limits.BodyLimit (413; 415 and 422 noted for
the validation handler). The error handlers (errors.py) only map exceptions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

from fastapi import Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from textstream.api.deps import Services, services_of
from textstream.api.errors import (
    RETRY_AFTER,
    BadHeaderError,
    InvalidInputError,
    RateLimitedError,
    ServiceError,
    error_response,
    refund,
)
from textstream.api.limits import undecodable
from textstream.api.security import Caller
from textstream.connections import UNREACHABLE
from textstream.job import MAX_QUEUE_TIMEOUT

log = logging.getLogger(__name__)


async def authorize(request: Request) -> Caller:
    """The caller, as CallerEdge settled it (a FastAPI dependency: a route that
    depends on it is one the edge guards)."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:  # an app served without the edge: settle it here
        caller = await settle(services_of(request), request, request.path_params)
    return caller


async def settle(services: Services, request: Request, path_params: dict[str, Any]) -> Caller:
    """Identify the caller, count the request, read its X-Queue-Timeout; raises the
    refusal (401, 429, 400) or Redis's failure."""
    guard = services.guard
    job_id = path_params.get("job_id", "") if request.url.path.endswith("/events") else ""
    client_ip = request.client.host if request.client else "unknown"
    token = request.query_params.get("access_token", "")
    caller = guard.identify(request.headers.get("authorization"), client_ip, job_id, token)
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
    TOKEN_RATE_LIMIT is on. Tokens remaining are before this request's own
    reservation."""
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


def guarded(scope: Scope) -> dict[str, Any] | None:
    """The path parameters of the route this request goes to, if that route needs a
    caller; None if not (or if no route takes it: the router answers 404 or 405).
    The router's own matching, done once more here."""
    for route in scope["app"].router.routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            dependant = getattr(route, "dependant", None)
            needs = dependant is not None and any(
                d.call is authorize for d in dependant.dependencies
            )
            return dict(child.get("path_params", {})) if needs else None
    return None


class CallerEdge:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services: Services | None = None
        if scope["type"] == "http":
            services = getattr(scope["app"].state, "services", None)
        path_params = None if services is None else guarded(scope)
        if services is None or path_params is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            await settle(services, request, path_params)
        except ServiceError as refusal:
            await self._refuse(
                request,
                refusal.status,
                refusal.error_type,
                str(refusal),
                refusal.field,
                dict(refusal.headers),
                receive,
                send,
            )
            return
        except UNREACHABLE as exc:
            log.warning("Redis unavailable settling a caller: %s", type(exc).__name__)
            message = "the job store (Redis) is unreachable; retry shortly"
            await self._refuse(
                request,
                503,
                "redis_unavailable",
                message,
                None,
                {"Retry-After": RETRY_AFTER},
                receive,
                send,
            )
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(
        request: Request,
        status: int,
        error_type: str,
        message: str,
        field: str | None,
        headers: dict[str, str],
        receive: Receive,
        send: Send,
    ) -> None:
        await refund(request)
        if request.headers.get("content-length", "0") != "0" or (
            "transfer-encoding" in request.headers
        ):
            # A body follows that nobody will read: the connection ends with this
            # answer (as BodyLimit's 413), or the client could send any amount for
            # the server to skip, and a body held back after `Expect: 100-continue`
            # would be read as the next request.
            headers["Connection"] = "close"
        response = error_response(request, status, error_type, message, field, headers)
        await response(request.scope, receive, send)
