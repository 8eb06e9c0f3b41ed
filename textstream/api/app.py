"""The app factory and its lifespan: `create_app(settings)` (app.py at the top of
the repo calls it; tests call it with their own settings).

The app never runs a model. A request becomes a `CompletionJob` on the ModelQ queue
(submit.py) and a stream of events read back from Redis (relay/sse.py).
Long-lived clients (the asyncio Redis pool, the streams' client when the streams
have a Redis of their own, the ModelQ producer) are made in `lifespan` and kept on
`app.state.services`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from starlette.staticfiles import StaticFiles

from textstream import __version__
from textstream.api import janitor, native, openai, openai_responses, operator, tokens
from textstream.api.cache import forget
from textstream.api.context_window import PromptTokens
from textstream.api.deps import Services
from textstream.api.edge import CallerEdge
from textstream.api.errors import add_error_handlers
from textstream.api.headers import SecurityHeaders
from textstream.api.leases import Leases
from textstream.api.limits import BodyLimit
from textstream.api.origin import SameOrigin
from textstream.api.queue import JobQueue
from textstream.api.relay.job_events import JobEvents, ReaderClaims
from textstream.api.relay.sse import mark_shutting_down
from textstream.api.requestlog import RequestLog
from textstream.api.security import Guard
from textstream.api.submit import prompt_char_limit
from textstream.config import Settings, get_settings
from textstream.connections import UNREACHABLE, StreamsClient, async_client, async_streams_client
from textstream.logs import configure_logging
from textstream.transport.events import stream_maxlen

log = logging.getLogger(__name__)


def docs_are_open(settings: Settings) -> bool:
    """DOCS=auto: the schema is public only while the API itself is."""
    if settings.docs == "open":
        return True
    return not settings.api_key_list


def hook_shutdown_signals(on_signal: Callable[[], object]) -> None:
    """Let open streams see SIGTERM/SIGINT as soon as the server does: chain a marker
    in front of the handlers the server (uvicorn) installed before starting us."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            mark_shutting_down()
            on_signal()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


async def warm_streams(streams: StreamsClient, seconds: float) -> None:
    """Read a cluster's slot map now, not under the first burst of requests (each of
    which would otherwise wait for it). A cluster that is away is not an error here:
    requests answer 503 until it is back."""
    if isinstance(streams, AsyncRedisCluster):
        try:
            async with asyncio.timeout(seconds):
                await streams.initialize()
        except UNREACHABLE as exc:
            log.warning("the streams' Redis Cluster is not reachable yet: %s", type(exc).__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = async_client(settings)
    streams = client if settings.streams_shared else async_streams_client(settings)

    async def forget_cached(key: str, job_id: str) -> None:
        await forget(client, key, job_id)

    jobs = JobEvents(
        streams,
        ttl=settings.job_ttl,
        maxlen=stream_maxlen(settings),
        forget_cache=forget_cached,
        # A claim lapses with its job's deadline (JOB_TIMEOUT from its creation).
        claims=ReaderClaims(uuid.uuid4().hex[:16], settings.job_timeout),
        read_grace=settings.redis_grace_seconds,
    )
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        hook_shutdown_signals(lambda: loop.call_soon_threadsafe(jobs.mux.interrupt))
    prompt_tokens = PromptTokens(settings.model_cache_dir)
    guard = Guard(settings, client)
    app.state.services = Services(
        settings,
        client,
        jobs,
        JobQueue(client, settings),
        prompt_tokens,
        guard,
        asyncio.Semaphore(settings.max_submitting),
    )
    await warm_streams(streams, settings.redis_timeout)
    if not guard.enabled:
        log.warning("API_KEYS is empty: the API is open to anyone who can reach it")
    watcher = asyncio.create_task(prompt_tokens.watch(client, settings.worker_heartbeat_seconds))
    housekeeping = asyncio.create_task(
        janitor.run(app.state.services, settings.housekeeping_seconds)
    )
    leases = Leases(app.state.services)
    leasing = asyncio.create_task(leases.run())
    try:
        yield
    finally:
        watcher.cancel()
        housekeeping.cancel()
        leasing.cancel()
        await leases.close()
        await jobs.close()
        if streams is not client:
            await streams.close()
        await client.close()


def longest_prompt(app: FastAPI) -> int:
    """The longest prompt the API takes, in characters (0 before start-up)."""
    services: Services | None = getattr(app.state, "services", None)
    return 0 if services is None else prompt_char_limit(services)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    app = FastAPI(
        title="textstream",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,  # served by operator.add_docs, behind the key when keys are set
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    add_error_handlers(app)
    app.include_router(operator.public)
    app.include_router(operator.router)
    app.include_router(native.router)
    app.include_router(openai.router)
    app.include_router(openai_responses.router)
    app.include_router(tokens.router)
    app.include_router(tokens.public)
    operator.add_docs(app, open_to_all=docs_are_open(settings))
    app.mount("/static", StaticFiles(packages=[("textstream.api", "static")]), name="static")
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, prompt_chars=lambda: longest_prompt(app)
    )
    app.add_middleware(CallerEdge)  # outside BodyLimit: the caller before the body
    app.add_middleware(  # outside both: a page on another site gets nothing started
        SameOrigin, allowed_hosts=settings.allowed_host_list, cors_origins=settings.cors_origin_list
    )
    app.add_middleware(RequestLog)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            expose_headers=["X-Job-Id", "X-Cache", "X-Request-Id"],
        )
    app.add_middleware(SecurityHeaders)  # outermost: on every answer, refusals too
    return app
