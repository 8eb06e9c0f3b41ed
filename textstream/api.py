"""The HTTP edge: routes, request validation, and the mapping of errors to statuses.

The app never runs a model. A request becomes a `CompletionJob` on the ModelQ queue
and a stream of events read back from Redis. Long-lived clients (the asyncio Redis
pool, the ModelQ producer) are made in `lifespan` and kept on `app.state`.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse

from textstream import __version__
from textstream.config import Settings, get_settings
from textstream.events import EventType, append_event
from textstream.logs import configure_logging
from textstream.queue import JobQueue
from textstream.registry import live_workers
from textstream.schemas import CompletionJob, PromptFormat, SamplingParams
from textstream.sse import stream_job_events

log = logging.getLogger(__name__)


class QueueUnavailableError(RuntimeError):
    """Redis (and so the queue) could not take the job in time."""


class PromptError(ValueError):
    """The prompt is empty or too long; `field` names the offending input."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def error_body(error_type: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message, **extra}}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    app.state.redis = aioredis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        # A blocked XREAD must not trip the read timeout: leave it room.
        socket_timeout=settings.read_block_ms / 1000 + settings.redis_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )
    app.state.queue = JobQueue(settings)
    try:
        yield
    finally:
        app.state.queue.close()
        await app.state.redis.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(title="textstream", version=__version__, lifespan=lifespan)
    app.state.settings = settings

    @app.exception_handler(QueueUnavailableError)
    async def _queue_unavailable(_: Request, exc: QueueUnavailableError) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content=error_body("queue_unavailable", str(exc)),
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(PromptError)
    async def _bad_prompt(_: Request, exc: PromptError) -> JSONResponse:
        return JSONResponse(
            status_code=422, content=error_body("invalid_request", str(exc), field=exc.field)
        )

    register_routes(app)
    return app


def register_routes(app: FastAPI) -> None:
    settings: Settings = app.state.settings

    @app.get("/completion/{question:path}", response_class=EventSourceResponse)
    async def completion(
        request: Request,
        question: Annotated[str, Path(description="the prompt, URL-encoded")],
        max_new_tokens: Annotated[int | None, Query(ge=1, le=settings.max_new_tokens_limit)] = None,
        temperature: Annotated[float, Query(ge=0.0, le=100.0)] = 0.0,
        top_p: Annotated[float, Query(gt=0.0, le=1.0)] = 1.0,
        top_k: Annotated[int, Query(ge=0)] = 0,
        seed: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
        ignore_eos: bool = False,
        prompt_format: PromptFormat = "auto",
    ) -> EventSourceResponse:
        """Stream a completion of `question` as SSE: `token` events, then `done` or `error`."""
        check_prompt(question, settings)
        params = SamplingParams(
            max_new_tokens=max_new_tokens or settings.default_max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            ignore_eos=ignore_eos,
        )
        job = await submit_job(request.app, question, params, prompt_format)
        return EventSourceResponse(
            stream_job_events(
                request.app.state.redis,
                job.job_id,
                block_ms=settings.read_block_ms,
                job_ttl=settings.job_ttl,
            ),
            ping=settings.sse_ping_seconds,
            headers={"X-Job-Id": job.job_id, "Cache-Control": "no-cache"},
        )

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """Liveness plus what is known: Redis reachability and live workers' models."""
        redis_ok, workers = True, []
        try:
            async with asyncio.timeout(settings.redis_timeout):
                await request.app.state.redis.ping()
                workers = await live_workers(
                    request.app.state.redis, settings.worker_heartbeat_seconds
                )
        except (RedisError, TimeoutError, OSError):
            redis_ok = False
        models = sorted({w.model for w in workers})
        return JSONResponse(
            {
                "status": "ok",
                "redis": redis_ok,
                "workers": len(workers),
                "model": models[0] if len(models) == 1 else (models or None),
                "models": models,
            }
        )


def check_prompt(prompt: str, settings: Settings) -> None:
    if not prompt.strip():
        raise PromptError("question", "the prompt is empty")
    if len(prompt) > settings.max_prompt_chars:
        raise PromptError(
            "question",
            f"the prompt is {len(prompt)} characters; the limit is {settings.max_prompt_chars}",
        )


async def submit_job(
    app: FastAPI, prompt: str, params: SamplingParams, prompt_format: PromptFormat
) -> CompletionJob:
    """Write the job's `queued` event, then hand the job to ModelQ.

    The event goes first so the stream exists before any worker can write to it,
    and so a dead Redis fails here, fast, before anything is queued.
    """
    settings: Settings = app.state.settings
    job = CompletionJob(
        job_id=uuid.uuid4().hex,
        prompt=prompt,
        prompt_format=prompt_format,
        params=params,
        enqueued_at=time.time(),
    )
    try:
        async with asyncio.timeout(settings.enqueue_timeout):
            await append_event(
                app.state.redis,
                job.job_id,
                EventType.QUEUED,
                {"job_id": job.job_id},
                ttl=settings.job_ttl,
            )
            await asyncio.to_thread(app.state.queue.enqueue, job)
    except (RedisError, TimeoutError, OSError) as exc:
        log.warning("job=%s could not be queued: %s", job.job_id, type(exc).__name__)
        raise QueueUnavailableError("the job queue (Redis) is unreachable; retry shortly") from exc
    log.info("job=%s queued max_new_tokens=%d", job.job_id, params.max_new_tokens)
    return job
