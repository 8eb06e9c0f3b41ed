"""Relay a job's Redis Stream to a client as Server-Sent Events.

One async generator per request owns its cleanup (as vLLM's `AsyncLLM.generate`):
when the client goes away, sse-starlette cancels the task reading the stream, and
the generator, if told to, asks the worker to stop generating, then re-raises.
The cancel request runs shielded, or the same cancellation would abort it too.

After the headers are sent, a failure is an `error` event that ends the stream,
never a half-closed socket.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sse_starlette import ServerSentEvent

from textstream.events import START_ID, EventType, JobEvent, error_data, read_events, request_cancel

log = logging.getLogger(__name__)


def to_sse(event: JobEvent) -> ServerSentEvent:
    return ServerSentEvent(
        data=json.dumps(event.data, ensure_ascii=False), event=event.event, id=event.id
    )


async def stream_job_events(
    client: aioredis.Redis,
    job_id: str,
    *,
    after: str = START_ID,
    block_ms: int = 5000,
    cancel_on_disconnect: bool = True,
    job_ttl: int = 3600,
) -> AsyncIterator[ServerSentEvent]:
    """SSE events for one job, from the entry after `after` to the terminal one."""
    finished = False
    try:
        async for event in read_events(client, job_id, after=after, block_ms=block_ms):
            finished = event.terminal
            yield to_sse(event)
    except RedisError as exc:
        log.warning("job=%s stream lost Redis: %s", job_id, exc)
        finished = True
        yield ServerSentEvent(
            data=json.dumps(error_data("redis_unavailable", "the event store is unreachable")),
            event=EventType.ERROR.value,
        )
    except BaseException:  # CancelledError / GeneratorExit: the client went away
        if cancel_on_disconnect and not finished:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await request_cancel(client, job_id, ttl=job_ttl)
                    log.info("job=%s client disconnected; cancel requested", job_id)
                except RedisError as exc:
                    log.warning("job=%s could not request cancel: %s", job_id, exc)
        raise
