"""Where this process's queued jobs stand, read once for all their readers.

Every reader of a job waiting in the queue sends a `queued` event each
QUEUE_STATUS_SECONDS with its position and its model's live workers. Asked per
reader (a ZRANK, the worker registry, an MGET of the workers' records), that was
four round trips per reader per period: 2,500 waiting readers saturated an API
process. Here one read of a model's queue order (every waiting job's position at
once) and one read of the worker registry serve every reader of the process: a
reader looks its job up in the latest snapshot, and only a snapshot older than
half a period is read again, by the first reader to need it, while the others
wait for that same read (single-flight, as registry.LiveModels does).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import redis.asyncio as aioredis

from textstream.api.queue import queue_order
from textstream.registry import live_workers

T = TypeVar("T")


@dataclass
class _Shared(Generic[T]):
    """A value read at most once per `max_age`, the read shared by every caller."""

    value: T | None = None
    read_at: float = float("-inf")
    reading: asyncio.Future[T] | None = None

    async def get(self, max_age: float, read: Callable[[], Awaitable[T]]) -> T:
        if self.value is not None and time.monotonic() - self.read_at < max_age:
            return self.value
        if self.reading is None:
            self.reading = asyncio.ensure_future(self._read(read))
        return await asyncio.shield(self.reading)

    async def _read(self, read: Callable[[], Awaitable[T]]) -> T:
        try:
            value = await read()
            self.value, self.read_at = value, time.monotonic()
            return value
        finally:
            self.reading = None


@dataclass
class QueueWatch:
    """Queue positions per model and live workers per model, each read at most
    twice per QUEUE_STATUS_SECONDS by this process, whatever its number of readers."""

    _orders: dict[str, _Shared[dict[str, int]]] = field(default_factory=dict)
    _workers: _Shared[Counter[str]] = field(default_factory=_Shared)

    async def report(
        self, client: aioredis.Redis, model: str, job_id: str, *, period: float
    ) -> dict[str, int | None]:
        """{"position": 1-based place in the queue (None once claimed), "workers": ...}."""
        max_age = period / 2

        async def read_order() -> dict[str, int]:
            return {job: n for n, job in enumerate(await queue_order(client, model), 1)}

        async def read_workers() -> Counter[str]:
            return Counter(w.model for w in await live_workers(client))

        shared = self._orders.get(model)
        if shared is None:
            shared = self._orders[model] = _Shared()
        # One after the other, not gathered: nearly always both are fresh, and then
        # neither awaits anything (gather made two tasks per report).
        positions = await shared.get(max_age, read_order)
        workers = await self._workers.get(max_age, read_workers)
        return {"position": positions.get(job_id), "workers": workers[model]}
