"""What every route depends on: the long-lived services (made in the lifespan, kept
on `app.state`). Who is calling is settled at the edge (edge.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi import Request

from textstream.api.context_window import PromptTokens
from textstream.api.queue import JobQueue
from textstream.api.queue_watch import QueueWatch
from textstream.api.relay.job_events import JobEvents
from textstream.api.security import Caller, Guard
from textstream.config import Settings
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


def tenant_of(services: Services, caller: Caller) -> str:
    """Whose a new job is: the caller's identity when API keys are on. An open API
    has no tenants ("" reads as everyone's)."""
    return caller.identity if services.guard.enabled else ""
