"""What every route depends on: the long-lived services (made in the lifespan, kept
on `app.state`) and who is calling (`authorize`, a FastAPI dependency)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import Request

from textstream.api.context_window import PromptTokens
from textstream.api.errors import InvalidInputError
from textstream.api.limits import undecodable
from textstream.api.security import Caller, Guard
from textstream.config import Settings
from textstream.jobqueue import JobQueue
from textstream.registry import LiveModels
from textstream.transport.events import JobEvents


@dataclass
class Services:
    """Long-lived clients, made in the app's lifespan and kept on `app.state`."""

    settings: Settings
    redis: aioredis.Redis
    jobs: JobEvents
    queue: JobQueue
    prompt_tokens: PromptTokens
    guard: Guard
    #: Bounds the submissions in hand at once (MAX_SUBMITTING): see submit.admitted_turn.
    submitting: asyncio.Semaphore
    #: The models live workers serve, as submissions resolve theirs (re-read each second).
    live_models: LiveModels = field(default_factory=LiveModels)


def services_of(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def authorize(request: Request) -> Caller:
    """Who is calling (API key, or per-job stream token on an events URL), and
    count the call against its rate limit. Raises for 401 / 429.

    A request refused after this point (404, 409, 422, 429, 503) takes its count
    back: errors.py calls `request.state.refund`. Refusals write nothing."""
    services = services_of(request)
    guard: Guard = services.guard
    job_id = request.path_params.get("job_id", "") if request.url.path.endswith("/events") else ""
    client_ip = request.client.host if request.client else "unknown"
    caller = guard.identify(
        request.headers.get("authorization"),
        client_ip,
        job_id=job_id,
        token=request.query_params.get("access_token", ""),
    )
    request.state.refund = await guard.count_request(caller)
    request.state.caller = caller
    part = undecodable(request.scope)
    if part is not None:  # the server decoded it with U+FFFD in place of its bytes
        raise InvalidInputError(part, f"{part} must be valid UTF-8 once percent-decoded")
    return caller


def tenant_of(services: Services, caller: Caller) -> str:
    """Whose a new job is: the caller's identity when API keys are on. An open API
    has no tenants ("" reads as everyone's)."""
    return caller.identity if services.guard.enabled else ""
