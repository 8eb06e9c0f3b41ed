"""Housekeeping the API processes share, every HOUSEKEEPING_SECONDS.

- A job nobody claimed before its deadline (no worker running) is taken off the
  queue and ended with `timeout`: its prompt does not wait in ModelQ's list for a
  worker, and it stops counting against MAX_QUEUED_JOBS. (A reader that is still
  open does the same at the deadline; this covers jobs nobody is reading.)
- ModelQ's ever-growing records are trimmed (jobqueue.trim_records).

Every API process runs it; each step is idempotent, so more processes only make it
run more often. Redis trouble is logged and retried next round.
"""

from __future__ import annotations

import asyncio
import logging
import time

from textstream.api.deps import Services
from textstream.api.models import all_models
from textstream.connections import UNREACHABLE
from textstream.jobqueue import expired_head, trim_records
from textstream.transport.events import TIMEOUT, EventType

log = logging.getLogger(__name__)

#: At most this many expired jobs taken off the queue per round.
BATCH = 100


async def sweep(services: Services) -> int:
    """One round; returns how many expired jobs it took off the queues."""
    ttl, now, removed = services.settings.job_ttl, time.time(), 0
    for model in await all_models(services):
        while removed < BATCH:
            job_id = await expired_head(services.redis, model, ttl, now)
            if job_id is None or not await services.queue.withdraw(job_id, model):
                break
            removed += 1
            await services.jobs.append(job_id, EventType.ERROR, TIMEOUT)
        await trim_records(services.redis, model, ttl, now)
    if removed:
        log.info("took %d expired job(s) off the queue", removed)
    return removed


async def run(services: Services, interval: float) -> None:
    while True:
        try:
            await sweep(services)
        except UNREACHABLE as exc:
            log.warning("queue housekeeping skipped: %s", type(exc).__name__)
        await asyncio.sleep(interval)
