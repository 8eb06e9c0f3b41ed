"""The token stream: one Redis Stream per job, written by a worker, read by the API.

Why Streams and not pub/sub: a reader that connects late, or reconnects, reads from
the id it last saw and misses nothing; the entry id doubles as the SSE `id:`.

Each entry has two fields: `event` (the SSE event name) and `data` (JSON text).
The writer is synchronous (it runs in the worker's ModelQ thread); the reader is
asynchronous (it runs on the API's event loop). Every write refreshes the key's
TTL, so a job's events disappear `JOB_TTL` seconds after its last event, on every
path, success or failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis

from textstream import keys

START_ID = "0-0"


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR})


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's stream. `id` is the Redis entry id ("ms-seq")."""

    id: str
    event: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


def encode_event(event: EventType, data: dict[str, Any]) -> dict[str, str]:
    return {"event": event.value, "data": json.dumps(data, ensure_ascii=False)}


def error_data(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


class EventWriter:
    """Appends one job's events. One pipeline round trip per event: XADD, EXPIRE and a
    read of the job's cancel flag, so checking for cancellation costs nothing extra."""

    def __init__(self, client: redis.Redis, job_id: str, *, ttl: int, maxlen: int) -> None:
        self._client = client
        self._stream = keys.job_events(job_id)
        self._cancel = keys.job_cancel(job_id)
        self._ttl = ttl
        # Approximate trimming never drops below maxlen; maxlen exceeds the most
        # events one job can produce, so nothing a reader might resume from is lost.
        self._maxlen = maxlen
        self.cancel_requested = False

    def write(self, event: EventType, data: dict[str, Any]) -> str:
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(self._stream, encode_event(event, data), maxlen=self._maxlen, approximate=True)
        pipe.expire(self._stream, self._ttl)
        pipe.exists(self._cancel)
        entry_id, _, cancelled = pipe.execute()
        self.cancel_requested = bool(cancelled)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def append_event(
    client: aioredis.Redis, job_id: str, event: EventType, data: dict[str, Any], *, ttl: int
) -> str:
    """Async single append, used by the API (the `queued` event)."""
    stream = keys.job_events(job_id)
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(stream, encode_event(event, data))
        pipe.expire(stream, ttl)
        entry_id, _ = await pipe.execute()
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


async def request_cancel(client: aioredis.Redis, job_id: str, *, ttl: int) -> None:
    await client.set(keys.job_cancel(job_id), b"1", ex=ttl)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def read_events(
    client: aioredis.Redis, job_id: str, *, after: str = START_ID, block_ms: int = 5000
) -> AsyncIterator[JobEvent]:
    """Yield a job's events after id `after`, blocking on XREAD until the terminal one.

    Ends after yielding `done` or `error`. Never polls: each XREAD blocks until an
    entry arrives or `block_ms` passes, then reads again from the last id seen.
    """
    stream = keys.job_events(job_id)
    last_id = after
    while True:
        response = await client.xread({stream: last_id}, count=512, block=block_ms)
        for _stream, entries in response or ():
            for raw_id, fields in entries:
                last_id = _decode(raw_id)
                event = JobEvent(
                    id=last_id, event=_decode(fields[b"event"]), data=json.loads(fields[b"data"])
                )
                yield event
                if event.terminal:
                    return
