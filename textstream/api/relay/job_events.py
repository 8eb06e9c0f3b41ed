"""The API's side of job streams (asyncio): create, append, cancel, read and look
up a job's stream (transport/events.py is the format both sides agree on), and the
claims this process holds on jobs for its readers (api/leases.py publishes them)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from textstream import keys
from textstream.api.relay.mux import ReadMux, StreamMissingError
from textstream.api.relay.placement import Placement
from textstream.connections import StreamsClient
from textstream.transport.events import (
    CANCELLED,
    START_ID,
    EventType,
    JobEvent,
    WriteOutcome,
    entry_span,
    id_key,
    parse_entries,
    parse_entry,
)
from textstream.transport.scripts import (
    APPEND_SCRIPT,
    CANCEL_SCRIPT,
    CREATE_SCRIPT,
    TRACK_SCRIPT,
    append_args,
    as_text,
    job_reply,
    new_event,
)


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"  # it had not started: ended now
    CANCELLING = "cancelling"  # running: its worker stops within one step
    FINISHED = "finished"  # it had already ended
    SHARED = "shared"  # other readers still follow it: left running
    UNKNOWN = "unknown"


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


class ResumePoint(StrEnum):
    """A Last-Event-ID against a job's stream (JobEvents.resume_point)."""

    UNKNOWN = "unknown"  # not one of the job's events
    ENDED = "ended"  # the job's last event, which ended it: nothing more will come
    OPEN = "open"  # events may follow


#: Drops a job's response-cache entry (key, job id) on the queue's Redis.
ForgetCache = Callable[[str, str], Awaitable[object]]


class ReaderClaims:
    """The claims this API process holds on jobs for its readers (a /completion
    client whose leaving cancels its job), each kept until the job's deadline at
    the latest. The process publishes them with its lease (api/leases.py): when it
    dies, another process drops them, and a job nobody else reads stops."""

    def __init__(self, process_id: str, hold_seconds: float) -> None:
        self.process_id = process_id
        self._hold_seconds = hold_seconds
        #: job id -> [claims, when they lapse anyway (the job's deadline has passed)]
        self._held: dict[str, list[float]] = {}
        #: Claims were taken since they were last published.
        self.unpublished = False

    def hold(self, job_id: str) -> None:
        entry = self._held.setdefault(job_id, [0, 0.0])
        entry[0] += 1
        entry[1] = time.time() + self._hold_seconds
        self.unpublished = True

    def published(self) -> None:
        self.unpublished = False

    def drop(self, job_id: str) -> None:
        entry = self._held.get(job_id)
        if entry is not None:
            entry[0] -= 1
            if entry[0] <= 0:
                del self._held[job_id]

    def current(self) -> dict[str, float]:
        """Job id -> until when, for the claims still held (lapsed ones forgotten)."""
        now = time.time()
        for job_id in [j for j, (_, until) in self._held.items() if until <= now]:
            del self._held[job_id]
        return {job_id: until for job_id, (_, until) in self._held.items()}


class JobEvents:
    """The API's side of job streams (asyncio): create, append, cancel, read, look
    up. `client` is the streams role: one Redis, or a Redis Cluster. `claims`: this
    process's reader claims (none for a client that takes none). `read_grace`: how
    long the shared blocking read retries a failing Redis before its readers see the
    error (REDIS_GRACE_SECONDS; None: at once, each reader retries on its own)."""

    def __init__(
        self,
        client: StreamsClient,
        *,
        ttl: int,
        maxlen: int,
        forget_cache: ForgetCache | None = None,
        claims: ReaderClaims | None = None,
        read_grace: float | None = None,
    ) -> None:
        self.client = client
        self._ttl = ttl
        self._maxlen = maxlen
        self._forget_cache = forget_cache
        self.claims = claims or ReaderClaims(uuid.uuid4().hex[:16], ttl)
        self._append = client.register_script(APPEND_SCRIPT)
        self._cancel = client.register_script(CANCEL_SCRIPT)
        self._create = client.register_script(CREATE_SCRIPT)
        self._track = client.register_script(TRACK_SCRIPT)
        self.placement = Placement(client)
        #: Blocking reads of all this process's relays share one XREAD per node (mux.py).
        self.mux = ReadMux(client, check_presence=True, grace=read_grace)

    async def close(self) -> None:
        await self.mux.close()

    async def new_job_id(self) -> str:
        """A fresh job id; on a cluster, one whose stream lands on a master chosen at
        random (placement.py)."""
        return await self.placement.new_job_id()

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
    ) -> JobEvent | None:
        """Write a new job's `queued` event and its state: that event (its id and
        data as a reader would read them back), or None if the job existed."""
        raw = json.dumps(data, ensure_ascii=False)
        entry_id = await self._create(
            keys=[keys.job_events(job_id), keys.job_state(job_id)],
            args=[
                raw,
                self._maxlen,
                self._ttl,
                tenant,
                "1" if shared else "0",
                self.claims.process_id if reader else "",
                "1" if pinned else "0",
                cache_key or "",
                model,
            ],
        )
        if not entry_id:
            return None
        if reader:
            self.claims.hold(job_id)
        return JobEvent(as_text(entry_id), EventType.QUEUED.value, data, (), raw)

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
            None if tenant is None else as_text(tenant),
            bool(shared),
            "" if model is None else as_text(model),
        )

    async def append(self, job_id: str, event: EventType, data: dict[str, Any]) -> WriteOutcome:
        """Write as no worker (the `queued` event, a timeout): refused once ended."""
        args = append_args([new_event(event, data)], maxlen=self._maxlen, ttl=self._ttl)
        (reply,) = await self._append(
            keys=[keys.job_events(job_id), keys.job_state(job_id)], args=args
        )
        outcome, _, cache_key = job_reply(reply)
        if cache_key:
            await self._forget(cache_key, job_id)
        return WriteOutcome(outcome)

    async def cancel(self, job_id: str, *, release: bool = False) -> CancelOutcome:
        """Cancel the job (DELETE), or with `release` drop one reader's claim on it
        and cancel only if it was the last (a /completion client leaving)."""
        reader = self.claims.process_id if release else ""
        if release:
            self.claims.drop(job_id)
        return await self._cancel_as(job_id, reader, "1")

    async def release_all(self, job_id: str, process_id: str) -> CancelOutcome:
        """Drop every claim a (dead) API process held on the job: it is cancelled if
        no other reader is left."""
        return await self._cancel_as(job_id, process_id, "all")

    async def _cancel_as(self, job_id: str, reader: str, count: str) -> CancelOutcome:
        outcome, cache_key = await self._cancel(
            keys=[keys.job_events(job_id), keys.job_state(job_id)],
            args=[json.dumps(CANCELLED), self._maxlen, self._ttl, reader, count],
        )
        if cache_key:
            await self._forget(as_text(cache_key), job_id)
        return CancelOutcome(as_text(outcome))

    async def _forget(self, cache_key: str, job_id: str) -> None:
        """A job that ended in error must not answer from the response cache."""
        if self._forget_cache is not None:
            await self._forget_cache(cache_key, job_id)

    async def track(self, job_id: str, *, reader: bool, pinned: bool = False) -> None:
        """Record who depends on a job: a `reader` whose leaving may cancel it
        (/completion), `pinned` (POST /jobs: only DELETE cancels)."""
        await self._track(
            keys=[keys.job_state(job_id)],
            args=[self._ttl, self.claims.process_id if reader else "", "1" if pinned else "0"],
        )
        if reader:
            self.claims.hold(job_id)

    async def first_event_id(self, job_id: str) -> str | None:
        """The id of the job's first (`queued`) event: when it was created."""
        first = await self.client.xrange(keys.job_events(job_id), count=1)
        return as_text(first[0][0]) if first else None

    async def usable(self, job_id: str) -> bool:
        """The job can answer a request (the response cache): its stream is there
        and it did not end in error."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(keys.job_events(job_id))
            pipe.hget(keys.job_state(job_id), "terminal")
            exists, terminal = await pipe.execute()
        return bool(exists) and terminal != b"error"

    async def resume_point(self, job_id: str, entry_id: str) -> ResumePoint:
        """Where a reader resuming after `entry_id` stands, in one round trip: the
        id must be one of the job's events (never another job's or a made-up one,
        which would skip events silently), and after the job's last event, if that
        ended it, nothing more will come."""
        stream = keys.job_events(job_id)
        async with self.client.pipeline(transaction=False) as pipe:
            # The entry holding the event: itself, or the run of tokens it starts.
            pipe.xrevrange(stream, max=entry_id, count=1)
            pipe.xrevrange(stream, count=1)
            found, last = await pipe.execute()
        wanted = id_key(entry_id)
        if not found or entry_span(*found[0])[1] < wanted:
            return ResumePoint.UNKNOWN  # the entry before it ends below it: no such event
        if id_key(last[0][0]) == wanted and parse_entry(*last[0])[-1].terminal:
            return ResumePoint.ENDED
        return ResumePoint.OPEN

    async def exists(self, job_id: str) -> bool:
        return bool(await self.client.exists(keys.job_events(job_id)))

    async def history(self, job_id: str, until: str = "+") -> list[JobEvent]:
        """The job's events, all of them or up to (and including) id `until`."""
        events = parse_entries(await self.client.xrange(keys.job_events(job_id), max=until))
        if until == "+":
            return events
        last = id_key(until)  # a run that holds `until` may go on after it
        return [event for event in events if id_key(event.id) <= last]

    async def _after(self, stream: str, last_id: str, count: int = 512) -> list[Any]:
        """What a non-blocking XREAD of `stream` after `last_id` returns, read with
        XRANGE: a cluster client must ask a node for XREAD's keys (COMMAND GETKEYS),
        and redis-py 4.6 keeps asking the node it first used, dead or alive, while
        XRANGE's key is where the client knows without asking."""
        if last_id == START_ID:  # from the start (a new reader): no run can hold it
            entries = await self.client.xrange(stream, min="-", count=count)
            return [(stream, entries)] if entries else []
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xrevrange(stream, max=last_id, count=1)  # a run that holds last_id
            pipe.xrange(stream, min=last_id, count=count + 1)
            holding, entries = await pipe.execute()
        start = id_key(last_id)
        after = [(i, f) for i, f in entries if id_key(i) > start][:count]
        if holding and entry_span(*holding[0])[1] > start:
            after.insert(0, holding[0])  # its tokens after last_id (the caller drops the rest)
        return [(stream, after)] if after else []

    async def read_batches(
        self,
        job_id: str,
        *,
        after: str = START_ID,
        block_ms: int | Callable[[], int | None] = 5000,
    ) -> AsyncIterator[list[JobEvent] | None]:
        """Yield a job's events after id `after`, blocking on XREAD, until the terminal
        one: every event one XREAD returned, together (a relay that fell behind sends
        them in one write). Yields None when a wait passes with nothing new, so the
        caller can check deadlines and report queue position between events.
        `block_ms` may be a function, asked before each wait how long it may last
        (None: until an event comes, or the process stops). Never polls.

        A wait that ends empty costs no round trip: the job ending writes its
        terminal event, which the wait would have returned, and a stream that
        vanishes (Redis lost its data) is noticed by the multiplexer's one check of
        all the streams it reads (mux.py), not by each reader."""
        wait = block_ms if callable(block_ms) else lambda: block_ms
        stream, state = keys.job_events(job_id), keys.job_state(job_id)
        last_id = after
        # The first read does not block, and tells an ended or vanished job.
        response = await self._after(stream, last_id)
        if not response:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.exists(stream)
                pipe.hexists(state, "terminal")
                exists, ended = await pipe.execute()
            if not exists:
                raise JobVanishedError(job_id)
            if ended:
                # Every event is in the stream (the terminal event and the flag are
                # written in one script), but the empty reply may have been read
                # before the job ran to its end: read once more before concluding
                # there is nothing after `last_id` (as when resuming after the end).
                response = await self._after(stream, last_id)
                if not response:
                    return
        while True:
            if not response:
                try:
                    entries = await self.mux.read(stream, last_id, wait())
                except StreamMissingError:
                    raise JobVanishedError(job_id) from None
                if not entries:
                    yield None
                    continue
                response = [(stream, entries)]
            batch: list[JobEvent] = []
            for _stream, entries in response:
                # `last_id` may be a token inside a run (a client's Last-Event-ID).
                for event in parse_entries(entries, after=last_id):
                    batch.append(event)
                    if event.terminal:
                        yield batch
                        return
            response = []
            if batch:
                last_id = batch[-1].id
                yield batch
