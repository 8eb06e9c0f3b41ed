"""The token stream: one Redis Stream per job, written by workers, read by the API.

Why Streams and not pub/sub: a reader that connects late, or reconnects, reads from
the id it last saw and misses nothing; the entry id doubles as the SSE `id:`.

Each entry has the fields `event` (the SSE event name), `data` (JSON text) and, on
token events, `ids`: the token ids whose text the event completes. A worker that
takes over a job rebuilds the exact token prefix from them.

Every write goes through one Lua script (APPEND_SCRIPT) that also keeps the job's
state hash (keys.job_state), so the rules hold atomically, whoever writes:

- a terminal event (`done`/`error`) is the last: later writes are refused;
- a worker writes only while it owns the job: taking a job over changes the owner,
  and a worker presumed dead that is in fact alive is refused ("stolen") instead of
  doubling tokens;
- each write returns the job's cancel flag, so checking it costs no round trip;
- each write refreshes both keys' TTL, so a job disappears `JOB_TTL` after its last
  event on every path.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
import redis.asyncio as aioredis

from textstream import keys
from textstream.config import Settings
from textstream.transport.mux import ReadMux, id_key

START_ID = "0-0"

#: Events a job may produce besides its tokens (status, seams, terminal).
EXTRA_EVENTS = 64


def stream_maxlen(settings: Settings) -> int:
    """MAXLEN of a job's stream: room for every token event and the rest, so a
    reader that starts late still reads the whole job."""
    return settings.max_new_tokens_limit + EXTRA_EVENTS


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    RESUMED = "resumed"
    TOKEN = "token"
    DONE = "done"
    ERROR = "error"


TERMINAL_EVENTS = frozenset({EventType.DONE, EventType.ERROR})


class WriteOutcome(StrEnum):
    OK = "ok"
    CANCEL = "cancel"  # written; a stop was requested
    CLOSED = "closed"  # refused: the job already ended
    STOLEN = "stolen"  # refused: another worker owns the job now


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # it had not started: ended now
    CANCELLING = "cancelling"  # running: its worker stops within one step
    FINISHED = "finished"  # it had already ended
    SHARED = "shared"  # other readers still follow it: left running
    UNKNOWN = "unknown"


# A job that ends in error must not stay in the response cache: both scripts drop
# the job's cache entry (named in its state hash) if it still points at this job.
# The cache key is read from the state hash rather than passed in KEYS, so these
# scripts assume a single Redis (not Redis Cluster).
FORGET_CACHE = """
local function forget_cache(job_id)
  local cache_key = redis.call('HGET', KEYS[2], 'cache_key')
  if cache_key and redis.call('GET', cache_key) == job_id then redis.call('DEL', cache_key) end
end
"""

# KEYS: stream, state. ARGV: event, data, ids, maxlen, ttl, terminal, owner, claim, seq, job.
# `seq` makes a worker's retried write idempotent: a write whose reply was lost is
# recognised by its owner:seq and not appended twice.
APPEND_SCRIPT = (
    FORGET_CACHE
    + """
local seq = ''
if ARGV[9] ~= '' then
  seq = ARGV[7] .. ':' .. ARGV[9]
  if redis.call('HGET', KEYS[2], 'seq') == seq then return {'', 'ok'} end
end
if redis.call('HGET', KEYS[2], 'terminal') then return {'', 'closed'} end
if ARGV[8] == '1' then
  redis.call('HSET', KEYS[2], 'owner', ARGV[7])
elseif ARGV[7] ~= '' and redis.call('HGET', KEYS[2], 'owner') ~= ARGV[7] then
  return {'', 'stolen'}
end
local id
if ARGV[3] ~= '' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*',
                  'event', ARGV[1], 'data', ARGV[2], 'ids', ARGV[3])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[1], 'data', ARGV[2])
end
if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'terminal', ARGV[1]) end
if ARGV[1] == 'error' then forget_cache(ARGV[10]) end
if seq ~= '' then redis.call('HSET', KEYS[2], 'seq', seq) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if redis.call('HGET', KEYS[2], 'cancel') then return {id, 'cancel'} end
return {id, 'ok'}
"""
)

# KEYS: stream, state. ARGV: data of the `cancelled` error event, maxlen, ttl, job,
# release. With release=1 the caller is a reader leaving (a client disconnecting
# from /completion): the job is cancelled only when no other such reader is left
# (identical requests share one job through the response cache), and never when it
# is `pinned` (created by POST /jobs, which only DELETE cancels).
CANCEL_SCRIPT = (
    FORGET_CACHE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'unknown' end
if redis.call('HGET', KEYS[2], 'terminal') then return 'finished' end
if ARGV[5] == '1' then
  if redis.call('HGET', KEYS[2], 'pinned') then return 'shared' end
  if redis.call('HINCRBY', KEYS[2], 'readers', -1) > 0 then return 'shared' end
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'cancel', now[1] * 1000 + math.floor(now[2] / 1000))
redis.call('EXPIRE', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[2], 'owner') then return 'cancelling' end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', 'error', 'data', ARGV[1])
redis.call('HSET', KEYS[2], 'terminal', 'error')
forget_cache(ARGV[4])
return 'cancelled'
"""
)


# KEYS: stream, state. ARGV: data of the `queued` event, maxlen, ttl, tenant, shared,
# reader, pinned, cache key, model. A job's first write: its `queued` event and its state
# (whose job it is, who may cancel it) in one step, so no reader ever sees a job
# without an owner. Returns '' if the job already exists (ids are never reused).
CREATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return '' end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
                      'event', 'queued', 'data', ARGV[1])
redis.call('HSET', KEYS[2], 'tenant', ARGV[4], 'model', ARGV[9])
if ARGV[5] == '1' then redis.call('HSET', KEYS[2], 'shared', '1') end
if ARGV[6] == '1' then redis.call('HSET', KEYS[2], 'readers', '1') end
if ARGV[7] == '1' then redis.call('HSET', KEYS[2], 'pinned', '1') end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[2], 'cache_key', ARGV[8]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return id
"""


class JobVanishedError(LookupError):
    """A job's stream and state are gone while it was being read: Redis lost its data
    (restarted without persistence, or flushed). No event will ever come."""


@dataclass(frozen=True)
class JobAccess:
    """Whose job it is: `tenant` is the creating caller's identity ("" when the API
    is open); `shared` jobs (in a global response cache) may be read by anyone."""

    exists: bool
    tenant: str | None
    shared: bool
    model: str = ""


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's stream. `id` is the Redis entry id ("ms-seq")."""

    id: str
    event: str
    data: dict[str, Any]
    token_ids: tuple[int, ...] = ()
    #: `data` as stored (JSON text), which the relay forwards without re-encoding.
    raw: str = ""

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


def entry_seconds(entry_id: str) -> float:
    """When an entry was written: a stream id is '<unix ms>-<seq>', on Redis's clock."""
    return int(entry_id.split("-", 1)[0]) / 1000


def error_data(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


CANCELLED = error_data("cancelled", "the job was cancelled")
TIMEOUT = error_data("timeout", "the job did not finish within JOB_TIMEOUT")
REDIS_LOST = error_data("redis_unavailable", "the event store is unreachable; reconnect later")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def append_args(
    event: EventType,
    data: dict[str, Any],
    *,
    token_ids: Sequence[int] = (),
    maxlen: int,
    ttl: int,
    owner: str = "",
    claim: bool = False,
    seq: int | None = None,
    job_id: str = "",
) -> list[str | int]:
    return [
        event.value,
        json.dumps(data, ensure_ascii=False),
        ",".join(map(str, token_ids)),
        maxlen,
        ttl,
        "1" if event in TERMINAL_EVENTS else "0",
        owner,
        "1" if claim else "0",
        "" if seq is None else str(seq),
        job_id,
    ]


def parse_entry(raw_id: bytes | str, fields: dict[bytes, bytes] | list[bytes]) -> JobEvent:
    """A stream entry, its fields as redis-py's dict or as Redis's flat list."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    ids = fields.get(b"ids")
    raw = fields[b"data"].decode()
    return JobEvent(
        id=_text(raw_id),
        event=_text(fields[b"event"]),
        data=json.loads(raw),
        token_ids=tuple(int(i) for i in ids.split(b",")) if ids else (),
        raw=raw,
    )


class EventWriter:
    """Appends one job's events for one worker attempt (`owner`): synchronous, one
    round trip per event, used from ModelQ's worker threads.

    Each write reports the job's state. When tokens produce no text for a while
    (held-back bytes, special tokens), `should_stop` reads the state itself at most
    every `poll_seconds`, so a cancel is never missed for long.

    A write that fails on the connection is retried for up to `grace` seconds
    (Redis restarting, a failover); its sequence number keeps the retry from
    appending the same event twice.
    """

    def __init__(
        self,
        client: redis.Redis,
        job_id: str,
        *,
        owner: str,
        ttl: int,
        maxlen: int,
        poll_seconds: float = 0.05,
        grace: float = 0.0,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self._keys = [keys.job_events(job_id), keys.job_state(job_id)]
        self._script = client.register_script(APPEND_SCRIPT)
        self.owner = owner
        self._ttl = ttl
        self._maxlen = maxlen
        self._poll_seconds = poll_seconds
        self._checked_at = time.monotonic()
        self._grace = grace
        self._seq = 0
        self.outcome = WriteOutcome.OK

    def refresh(self) -> WriteOutcome:
        """Read the job's state without writing (what a write would have reported)."""
        terminal, owner, cancel = self._client.hmget(self._keys[1], "terminal", "owner", "cancel")
        if terminal:
            self.outcome = WriteOutcome.CLOSED
        elif owner is not None and _text(owner) != self.owner:
            self.outcome = WriteOutcome.STOLEN
        elif cancel:
            self.outcome = WriteOutcome.CANCEL
        self._checked_at = time.monotonic()
        return self.outcome

    def history(self) -> list[JobEvent]:
        """Every event the job has so far (a takeover resumes from these)."""
        return [parse_entry(i, f) for i, f in self._client.xrange(self._keys[0])]

    def write(
        self,
        event: EventType,
        data: dict[str, Any],
        token_ids: Sequence[int] = (),
        *,
        claim: bool = False,
    ) -> WriteOutcome:
        self._seq += 1
        args = append_args(
            event,
            data,
            token_ids=token_ids,
            maxlen=self._maxlen,
            ttl=self._ttl,
            owner=self.owner,
            claim=claim,
            seq=self._seq,
            job_id=self.job_id,
        )
        give_up = time.monotonic() + self._grace
        while True:
            try:
                _entry_id, outcome = self._script(keys=self._keys, args=args)
                break
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() >= give_up:
                    raise
                time.sleep(0.25)
        self.outcome = WriteOutcome(_text(outcome))
        self._checked_at = time.monotonic()
        return self.outcome

    @property
    def should_stop(self) -> bool:
        if (
            self.outcome is WriteOutcome.OK
            and time.monotonic() - self._checked_at > self._poll_seconds
        ):
            self.refresh()
        return self.outcome is not WriteOutcome.OK

    @property
    def cancel_requested(self) -> bool:
        return self.outcome is WriteOutcome.CANCEL

    @property
    def lost_job(self) -> bool:
        """The job ended elsewhere (closed) or another worker owns it (stolen)."""
        return self.outcome in (WriteOutcome.CLOSED, WriteOutcome.STOLEN)


class JobEvents:
    """The API's side of job streams (asyncio): append, cancel, read, look up."""

    def __init__(self, client: aioredis.Redis, *, ttl: int, maxlen: int) -> None:
        self.client = client
        self._ttl = ttl
        self._maxlen = maxlen
        self._append = client.register_script(APPEND_SCRIPT)
        self._cancel = client.register_script(CANCEL_SCRIPT)
        self._create = client.register_script(CREATE_SCRIPT)
        #: Blocking reads of all this process's relays share one XREAD (mux.py).
        self.mux = ReadMux(client)

    async def close(self) -> None:
        await self.mux.close()

    async def create(
        self,
        job_id: str,
        data: dict[str, Any],
        *,
        tenant: str,
        model: str = "",
        shared: bool = False,
        reader: bool = False,
        pinned: bool = False,
        cache_key: str | None = None,
    ) -> bool:
        """Write a new job's `queued` event and its state; False if it existed."""
        entry_id = await self._create(
            keys=[keys.job_events(job_id), keys.job_state(job_id)],
            args=[
                json.dumps(data, ensure_ascii=False),
                self._maxlen,
                self._ttl,
                tenant,
                "1" if shared else "0",
                "1" if reader else "0",
                "1" if pinned else "0",
                cache_key or "",
                model,
            ],
        )
        return bool(entry_id)

    async def discard(self, job_id: str) -> None:
        """Remove a job that was refused after its stream was written (nobody has
        its id yet): a refusal leaves nothing behind."""
        await self.client.delete(keys.job_events(job_id), keys.job_state(job_id))

    async def access(self, job_id: str) -> JobAccess:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(keys.job_events(job_id))
            pipe.hmget(keys.job_state(job_id), "tenant", "shared", "model")
            exists, (tenant, shared, model) = await pipe.execute()
        return JobAccess(
            bool(exists),
            None if tenant is None else _text(tenant),
            bool(shared),
            "" if model is None else _text(model),
        )

    async def append(self, job_id: str, event: EventType, data: dict[str, Any]) -> WriteOutcome:
        """Write as no worker (the `queued` event, a timeout): refused once ended."""
        args = append_args(event, data, maxlen=self._maxlen, ttl=self._ttl, job_id=job_id)
        _entry_id, outcome = await self._append(
            keys=[keys.job_events(job_id), keys.job_state(job_id)], args=args
        )
        return WriteOutcome(_text(outcome))

    async def cancel(self, job_id: str, *, release: bool = False) -> CancelOutcome:
        """Cancel the job (DELETE), or with `release` drop one reader's claim on it
        and cancel only if it was the last (a /completion client leaving)."""
        outcome = await self._cancel(
            keys=[keys.job_events(job_id), keys.job_state(job_id)],
            args=[json.dumps(CANCELLED), self._maxlen, self._ttl, job_id, "1" if release else "0"],
        )
        return CancelOutcome(_text(outcome))

    async def track(
        self, job_id: str, *, reader: bool, pinned: bool = False, cache_key: str | None = None
    ) -> None:
        """Record who depends on a job: a `reader` whose leaving may cancel it
        (/completion), `pinned` (POST /jobs: only DELETE cancels), its cache entry."""
        state = keys.job_state(job_id)
        async with self.client.pipeline(transaction=True) as pipe:
            if reader:
                pipe.hincrby(state, "readers", 1)
            if pinned:
                pipe.hset(state, "pinned", 1)
            if cache_key:
                pipe.hset(state, "cache_key", cache_key)
            pipe.expire(state, self._ttl)
            await pipe.execute()

    async def has_event_at_or_after(self, job_id: str, entry_id: str) -> bool:
        """Whether the stream's last entry is at or after `entry_id`: a reader may
        resume from any id the stream has given out, never from a later one."""
        last = await self.client.xrevrange(keys.job_events(job_id), count=1)
        return bool(last) and id_key(last[0][0]) >= id_key(entry_id)

    async def exists(self, job_id: str) -> bool:
        return bool(await self.client.exists(keys.job_events(job_id)))

    async def history(self, job_id: str, until: str = "+") -> list[JobEvent]:
        """The job's events, all of them or up to (and including) id `until`."""
        entries = await self.client.xrange(keys.job_events(job_id), max=until)
        return [parse_entry(i, f) for i, f in entries]

    async def read_batches(
        self, job_id: str, *, after: str = START_ID, block_ms: int = 5000
    ) -> AsyncIterator[list[JobEvent] | None]:
        """Yield a job's events after id `after`, blocking on XREAD, until the terminal
        one: every event one XREAD returned, together (a relay that fell behind sends
        them in one write). Yields None when `block_ms` passes with nothing new, so
        the caller can check deadlines and report queue position between events.
        Never polls."""
        stream, state = keys.job_events(job_id), keys.job_state(job_id)
        last_id, block = after, None  # the first read does not block
        while True:
            if block is None:
                response = await self.client.xread({stream: last_id}, count=512)
            else:
                entries = await self.mux.read(stream, last_id, block)
                response = [(stream, entries)] if entries else []
            if not response:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.exists(stream)
                    pipe.hexists(state, "terminal")
                    exists, ended = await pipe.execute()
                if not exists:
                    raise JobVanishedError(job_id)
                if not ended:
                    if block is not None:
                        yield None
                    block = block_ms
                    continue
                # The job has ended, so every event is in the stream (the terminal
                # event and the flag are written in one script). But the empty reply
                # above may have been read late, after the job ran to its end: read
                # once more without blocking before concluding there is nothing after
                # `last_id` (as when resuming after the end).
                response = await self.client.xread({stream: last_id}, count=512)
                if not response:
                    return
            block = block_ms
            batch: list[JobEvent] = []
            for _stream, entries in response:
                for raw_id, fields in entries:
                    batch.append(parse_entry(raw_id, fields))
                    if batch[-1].terminal:
                        yield batch
                        return
            if batch:
                last_id = batch[-1].id
                yield batch
