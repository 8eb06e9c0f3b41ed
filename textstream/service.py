"""What the routes do, without HTTP: checking input, submitting jobs, looking them up.

Errors here are domain exceptions; `api.py` maps each to a status code once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import unicodedata
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from textstream import keys
from textstream.cache import cache_key, cached_job, claim, forget, served_model
from textstream.config import Settings
from textstream.events import EventType, JobEvents, entry_seconds
from textstream.queue import JobQueue, queue_length
from textstream.schemas import CompletionJob, GenerationRequest
from textstream.security import Guard
from textstream.tokenizer import PromptTokens

log = logging.getLogger(__name__)

#: Characters allowed in a prompt although Unicode calls them control characters.
ALLOWED_CONTROLS = frozenset("\n\r\t")


class InvalidInputError(ValueError):
    """Input the API refuses; `field` names it in the 422 body."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class QueueUnavailableError(RuntimeError):
    """Redis (and so the queue) could not take the job in time."""


class QueueFullError(RuntimeError):
    """MAX_QUEUED_JOBS jobs are already waiting."""


class JobNotFoundError(LookupError):
    """No such job: never created, or expired after JOB_TTL."""


@dataclass
class Services:
    """Long-lived clients, made in the app's lifespan and kept on `app.state`."""

    settings: Settings
    redis: aioredis.Redis
    jobs: JobEvents
    queue: JobQueue
    prompt_tokens: PromptTokens
    guard: Guard


def check_prompt(prompt: str, settings: Settings, field: str) -> None:
    if not prompt.strip():
        raise InvalidInputError(field, "the prompt is empty")
    if len(prompt) > settings.max_prompt_chars:
        raise InvalidInputError(
            field,
            f"the prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
        )
    if "\ufffd" in prompt and field == "question":
        raise InvalidInputError(field, "the path is not valid UTF-8")
    for ch in prompt:
        if ch not in ALLOWED_CONTROLS and unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidInputError(field, f"the prompt contains control character U+{ord(ch):04X}")


async def check_context_window(
    services: Services,
    prompt: str,
    request: GenerationRequest,
    field: str,
    messages: list[dict[str, str]] | None = None,
) -> None:
    counted = await services.prompt_tokens.count(prompt, request.prompt_format, messages)
    if counted is not None and counted[0] >= counted[1]:
        raise InvalidInputError(
            field, f"the prompt is {counted[0]} tokens; the model's context window is {counted[1]}"
        )


def check_request(request: GenerationRequest, settings: Settings) -> None:
    limit = settings.max_new_tokens_limit
    if request.max_new_tokens is not None and request.max_new_tokens > limit:
        raise InvalidInputError("max_new_tokens", f"max_new_tokens must be at most {limit}")


@dataclass
class Submission:
    job_id: str
    deadline: float | None
    #: Answered by an existing job (cache hit, or an identical request in flight).
    shared: bool = False


async def start_job(
    services: Services,
    request: GenerationRequest,
    *,
    prompt: str = "",
    messages: list[dict[str, str]] | None = None,
    reader: bool,
    pinned: bool = False,
) -> Submission:
    """Answer from the response cache, or queue a new job.

    `reader`: the caller's leaving may cancel the job (/completion, OpenAI);
    `pinned`: only DELETE may cancel it (POST /jobs).
    """
    settings = services.settings
    params = request.sampling(settings.default_max_new_tokens)
    now = time.time()
    job = CompletionJob(
        job_id=uuid.uuid4().hex,
        prompt=prompt,
        messages=messages,
        prompt_format=request.prompt_format,
        params=params,
        enqueued_at=now,
        deadline=now + settings.job_timeout,
    )
    try:
        async with asyncio.timeout(settings.enqueue_timeout):
            key = await cache_key_for(services, job, request.use_cache)
            if key:
                followed = await follow_cached(services, key, reader=reader, pinned=pinned)
                if followed is None and not await claim(
                    services.redis, key, job.job_id, settings.cache_ttl
                ):
                    followed = await follow_cached(services, key, reader=reader, pinned=pinned)
                if followed is not None:
                    return followed
            await queue_job(services, job, key, reader=reader, pinned=pinned)
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning("job=%s could not be queued: %s", job.job_id, type(exc).__name__)
        raise QueueUnavailableError("the job queue (Redis) is unreachable; retry shortly") from exc
    log.info("job=%s queued max_new_tokens=%d", job.job_id, params.max_new_tokens)
    return Submission(job.job_id, job.deadline)


async def cache_key_for(services: Services, job: CompletionJob, use_cache: bool) -> str | None:
    if not (use_cache and services.settings.cache_ttl and job.params.deterministic):
        return None
    model = await served_model(services.redis)
    if model is None:
        return None  # no worker has ever announced a model: nothing can be cached yet
    return cache_key(model, job.prompt, job.messages, job.prompt_format, job.params)


async def follow_cached(
    services: Services, key: str, *, reader: bool, pinned: bool
) -> Submission | None:
    job_id = await cached_job(services.redis, key)
    if job_id is None:
        return None
    await services.jobs.track(job_id, reader=reader, pinned=pinned)
    log.info("job=%s answered from the response cache", job_id)
    return Submission(job_id, await job_deadline(services, job_id), shared=True)


async def queue_job(
    services: Services, job: CompletionJob, key: str | None, *, reader: bool, pinned: bool
) -> None:
    """Write the job's `queued` event, then hand the job to ModelQ.

    The event goes first so the stream exists before any worker can write to it,
    and so a dead Redis fails here, fast, before anything is queued.
    """
    waiting = await queue_length(services.redis)
    if waiting >= services.settings.max_queued_jobs:
        if key:
            await forget(services.redis, key, job.job_id)
        raise QueueFullError(f"{waiting} jobs are waiting; retry shortly")
    await services.jobs.append(
        job.job_id, EventType.QUEUED, {"job_id": job.job_id, "position": waiting + 1}
    )
    await services.jobs.track(job.job_id, reader=reader, pinned=pinned, cache_key=key)
    await services.queue.submit(job)


async def job_deadline(services: Services, job_id: str) -> float | None:
    """The job's deadline, from its first (`queued`) event. Raises if there is no job."""
    first = await services.redis.xrange(keys.job_events(job_id), count=1)
    if not first:
        raise JobNotFoundError(job_id)
    return entry_seconds(first[0][0].decode()) + services.settings.job_timeout
