"""Housekeeping the API processes share, every HOUSEKEEPING_SECONDS.

- A job nobody claimed before its deadline (no worker running) is taken off the
  queue and ended with `timeout`: its prompt does not wait in ModelQ's list for a
  worker, and it stops counting against MAX_QUEUED_JOBS. (A reader that is still
  open does the same at the deadline; this covers jobs nobody is reading.)
- A job for a model that is neither configured here nor served by a live worker,
  none of whose workers was seen for NO_WORKER_SECONDS (gone, not restarting),
  ends with `no_worker` once it has waited as long, instead of until JOB_TIMEOUT.
- ModelQ's ever-growing records are trimmed (api/queue.trim_records).
- Every REHOME_SECONDS (not only every HOUSEKEEPING_SECONDS): jobs waiting for a
  name whose worker serves a fallback in its place (api/models.py) move to the
  fallback's queue, so a first question asked while the model loads is answered
  once it has, not at JOB_TIMEOUT; and jobs still waiting past their
  `queue_timeout` leave the queue with `queue_timeout` (a worker that claims one
  first skips it too, so it never runs either way).

Every API process runs it; each step is idempotent, so more processes only make it
run more often. Redis trouble is logged and retried next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from textstream.api.deps import Services
from textstream.api.models import all_models, configured_model, live_models
from textstream.api.queue import expired_head, overdue, trim_records, waiting_since
from textstream.connections import UNREACHABLE
from textstream.keys import queue_deadlines
from textstream.transport.events import QUEUE_TIMEOUT, TIMEOUT, ErrorType, EventType, error_data

log = logging.getLogger(__name__)

#: At most this many expired jobs taken off the queue per round.
BATCH = 100
#: How often jobs waiting for a model served under a fallback are moved to it (a
#: registry read, shared with the submissions' own: LiveModels).
REHOME_SECONDS = 1.0


#: A job moved off a queue whose fallback's queue had no room (MAX_QUEUED_JOBS).
FALLBACK_FULL = error_data(
    ErrorType.QUEUE_FULL, "the model is served by its fallback now, whose queue is full; try again"
)


def no_worker(model: str) -> dict[str, Any]:
    why = f"no worker serves the model `{model}` now (none came within NO_WORKER_SECONDS)"
    return error_data(ErrorType.NO_WORKER, why)


async def sweep(services: Services) -> int:
    """One round; returns how many jobs it took off the queues."""
    settings, now, removed = services.settings, time.time(), 0
    live = set(await live_models(services))
    for model, known in (await all_models(services)).items():
        while removed < BATCH:
            job_id = await expired_head(services.redis, model, settings.job_ttl, now)
            if job_id is None or not await services.queue.withdraw(job_id, model):
                break
            removed += 1
            await services.jobs.append(job_id, EventType.ERROR, TIMEOUT)
        # Gone, not restarting: no worker of it for NO_WORKER_SECONDS (a reload of
        # its weights takes less), and not this deployment's own.
        cutoff = now - settings.no_worker_seconds
        configured = (configured_model(settings), settings.default_model)
        if model not in live and model not in configured and known and known.seen_at < cutoff:
            removed += await end_unserved(services, model, cutoff)
        await trim_records(services.redis, model, settings.job_ttl, now)
    if removed:
        log.info("took %d job(s) off the queues", removed)
    return removed


async def end_unserved(services: Services, model: str, queued_before: float) -> int:
    """End the jobs for `model`, which no live worker serves, queued before then."""
    ended = 0
    for job_id in await waiting_since(services.redis, model, queued_before, BATCH):
        if await services.queue.withdraw(job_id, model):
            await services.jobs.append(job_id, EventType.ERROR, no_worker(model))
            ended += 1
    return ended


async def rehome(services: Services) -> int:
    """Move the jobs waiting for a name served by a fallback to the fallback's
    queue; returns how many moved."""
    await live_models(services)  # refreshes the aliases
    moved = 0
    for name, fallback in services.live_models.aliases.items():
        for job_id in await waiting_since(services.redis, name, time.time(), BATCH):
            done = await services.queue.move(job_id, name, fallback)
            if done is None:  # off one queue, and the other is full
                await services.jobs.append(job_id, EventType.ERROR, FALLBACK_FULL)
            moved += bool(done)
    if moved:
        log.info("moved %d job(s) to the fallback model's queue", moved)
    return moved


async def end_overdue(services: Services) -> int:
    """End the jobs still waiting past their queue_timeout; returns how many."""
    now, ended = time.time(), 0
    for model in await all_models(services):
        due = await overdue(services.redis, model, now, BATCH)
        for job_id in due:
            if await services.queue.withdraw(job_id, model):  # else a worker has it
                await services.jobs.append(job_id, EventType.ERROR, QUEUE_TIMEOUT)
                ended += 1
        if due:
            await services.redis.zrem(queue_deadlines(model), *due)
    if ended:
        log.info("ended %d job(s) past their queue_timeout", ended)
    return ended


async def run(services: Services, interval: float) -> None:
    due = 0.0
    while True:
        try:
            await rehome(services)
            await end_overdue(services)
            if time.monotonic() >= due:
                await sweep(services)
                due = time.monotonic() + interval
        except UNREACHABLE as exc:
            log.warning("queue housekeeping skipped: %s", type(exc).__name__)
        await asyncio.sleep(min(interval, REHOME_SECONDS))
