"""Relay a job's Redis Stream to a client as Server-Sent Events.

One async generator per request owns its cleanup (as vLLM's `AsyncLLM.generate`):
when the client goes away, sse-starlette cancels the task reading the stream, and
the generator, if told to (`/completion`, not `/jobs/{id}/events`), asks the
worker to stop generating, then re-raises. The cancel request runs shielded, or
the same cancellation would abort it too.

After the headers are sent, a failure is an `error` event that ends the stream,
never a half-closed socket. Redis may vanish for up to REDIS_GRACE_SECONDS: the
reader retries from the last id it relayed, so nothing is lost or repeated (a
blocking read's retries are the multiplexer's, one per lane, mux.py). On a
Redis Cluster the same grace covers a failover, a slot moving (MOVED, ASK,
TRYAGAIN) and the cluster's own errors (CLUSTERDOWN, "cannot be connected").

While a job waits in the queue, the reader sends a `queued` event every
QUEUE_STATUS_SECONDS with its position and the number of live workers (0 says
"waiting for a worker"). These status events are not stored and carry no id.
If the job's deadline passes before it ends, the reader ends it with `timeout`.

An idle reader costs no round trip of its own: it waits in the process's one
XREAD (mux.py) until an event comes, its next queue report is due, or its
deadline passes (a comparison with the local clock). The queue report is looked
up in snapshots shared by every reader of the process (api/queue_watch.py), and
the check that the job's stream still exists is one command for all streams (mux).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from sse_starlette import ServerSentEvent
from sse_starlette.sse import AppStatus

from textstream.api.relay.job_events import CancelOutcome, JobEvents, JobVanishedError
from textstream.api.relay.mux import ReadsFailedError
from textstream.api.relay.thinking import ThinkSplitter
from textstream.config import Settings
from textstream.connections import REDIS_ERRORS
from textstream.logs import brief
from textstream.transport.events import (
    REDIS_LOST,
    START_ID,
    TERMINAL_EVENTS,
    TIMEOUT,
    ErrorType,
    EventType,
    JobEvent,
    WriteOutcome,
    error_data,
)

log = logging.getLogger(__name__)

#: Where a queued job stands: {"position": ..., "workers": ...} (the API's queue
#: knows; the relay only asks).
QueueReport = Callable[[str], Awaitable[dict[str, Any]]]
#: Takes a job that ended before a worker claimed it off the queue.
Withdraw = Callable[[str], Awaitable[object]]

#: Whether a job outlives this API process. False under a `textstream serve` that
#: started its own Redis: that Redis keeps nothing on disk and stops with it, so a
#: stream it ends cannot be resumed anywhere, and its message must not say so.
_jobs_outlive_api = True


def set_jobs_outlive_api(outlive: bool) -> None:
    global _jobs_outlive_api
    _jobs_outlive_api = outlive


def shutdown_data(job_id: str) -> dict[str, Any]:
    """The `error` event (type `shutdown`) that ends a stream when the API process
    stops: it names the job, and promises a resume (Last-Event-ID, from this URL or
    another API process) only where the job's Redis will keep it."""
    if _jobs_outlive_api:
        message = (
            f"this API process is shutting down; job {job_id} goes on: reconnect with"
            f" Last-Event-ID (to /completion, or GET /jobs/{job_id}/events) for the rest"
        )
    else:
        message = (
            f"the server is shutting down and job {job_id} ends with it (the Redis it"
            " runs on stops too); send the request again once the server is back"
        )
    return error_data(ErrorType.SHUTDOWN, message)


#: Set on SIGTERM/SIGINT (api/app.py hooks the server's signal handlers). An Event,
#: so that `textstream serve` can start stopping its workers at the same moment.
STOPPING = threading.Event()


def mark_shutting_down() -> None:
    STOPPING.set()


def shutting_down() -> bool:
    """The server got SIGTERM/SIGINT. uvicorn then waits for open connections to
    close: open streams must end themselves, or it waits for every job to finish.
    (sse-starlette 3.0 means to do this, but its hook on uvicorn's handler is only
    installed when it is imported before uvicorn captures the signals, which is
    not the case when the app is loaded by uvicorn; so the app hooks them itself.)"""
    return STOPPING.is_set() or bool(AppStatus.should_exit)


#: shutdown_data() for an answer that was not streamed (there is nothing to resume).
SHUTDOWN_UNSTREAMED = error_data(
    ErrorType.SHUTDOWN, "this API process is shutting down; send the request again (Retry-After)"
)

#: The job's stream vanished under an open reader: Redis lost its data.
JOB_LOST = error_data(
    ErrorType.REDIS_UNAVAILABLE, "the event store lost this job (Redis restarted without its data)"
)


@dataclass(frozen=True)
class QueueHooks:
    """What a relay may ask of the queue, which it does not import."""

    report: QueueReport
    withdraw: Withdraw


def to_sse(event: JobEvent) -> ServerSentEvent:
    """Stored events keep their stream id; status events (empty id) carry none."""
    text = event.raw or json.dumps(event.data, ensure_ascii=False)
    return ServerSentEvent(data=text, event=event.event, id=event.id or None)


class Converter(Protocol):
    """Turns a job's events into what one kind of client reads."""

    def convert(self, event: JobEvent) -> Iterable[ServerSentEvent]: ...

    def catch_up(self, events: list[JobEvent]) -> None:
        """Events the client already has (it resumes after them): take their state."""
        ...


class NativeEvents:
    """The native stream: each stored event as it is, except that with
    `split_thinking` a `<think>` block at the start of the text comes as `thinking`
    events (thinking.py). A piece that splits in two gives two events; only the
    last carries the stored event's id, and an event whose text is all held back
    gives none, so a client resuming from its last id never misses held text."""

    def __init__(self, split_thinking: bool, job_id: str | None = None) -> None:
        self._splitter = ThinkSplitter() if split_thinking else None
        #: Ids as `<job id>:<event id>` (/completion): a reconnect's Last-Event-ID then
        #: names its job, which the URL does not.
        self._prefix = f"{job_id}:" if job_id else ""

    def catch_up(self, events: list[JobEvent]) -> None:
        for event in events:
            if self._splitter is not None and event.event == EventType.TOKEN:
                self._splitter.feed(event.data["text"])

    def convert(self, event: JobEvent) -> Iterable[ServerSentEvent]:
        out = self._convert(event)
        if self._prefix:
            for sse in out:
                if sse.id:
                    sse.id = self._prefix + sse.id
        return out

    def _convert(self, event: JobEvent) -> list[ServerSentEvent]:
        splitter = self._splitter
        if splitter is None or event.event not in (EventType.TOKEN, *TERMINAL_EVENTS):
            return [to_sse(event)]
        if event.event == EventType.TOKEN:
            pieces = splitter.feed(event.data["text"])
            if pieces == [("answer", event.data["text"])]:
                return [to_sse(event)]  # the common case: forwarded as stored
            out = [split_event(kind, text) for kind, text in pieces]
            if out:
                out[-1].id = event.id
            return out
        return [*(split_event(kind, text) for kind, text in splitter.flush()), to_sse(event)]


def split_event(kind: str, text: str) -> ServerSentEvent:
    name = "thinking" if kind == "thinking" else EventType.TOKEN.value
    return ServerSentEvent(data=json.dumps({"text": text}, ensure_ascii=False), event=name)


def status_event(name: EventType, data: dict[str, Any]) -> JobEvent:
    """An event made by the reader, not stored in the stream (so it has no id)."""
    return JobEvent(id="", event=name.value, data=data)


@dataclass
class Relay:
    """What one stream needs: where to read, and its limits."""

    jobs: JobEvents
    settings: Settings
    job_id: str
    deadline: float | None = None
    cancel_on_disconnect: bool = False
    queue: QueueHooks | None = None
    #: A new job's `queued` event as its submission wrote it (the first entry of its
    #: stream): a read from the start begins after it instead of reading it back.
    first: JobEvent | None = None
    #: With cancel_on_disconnect: how long the job waits for its client to come back
    #: (RECONNECT_GRACE_SECONDS) before the claim its leaving drops is dropped.
    grace: float = 0.0

    def wait_ms(self, started: bool) -> int | None:
        """How long a read may wait for the next event: until the next queue report
        while the job waits, and no later than its deadline; READ_BLOCK_MS for a
        reader with neither."""
        waits = []
        if not started and self.queue is not None:
            waits.append(self.settings.queue_status_seconds * 1000)
        if self.deadline is not None:
            # A millisecond past it, so that the check after the wait sees it passed.
            waits.append((self.deadline - time.time()) * 1000 + 1)
        if not waits:
            return self.settings.read_block_ms
        return max(1, math.ceil(min(waits)))

    async def idle_status(self, started: bool) -> JobEvent | None:
        """Called when nothing arrived for a while: enforce the deadline, or report
        the queue position of a job that has not started."""
        if self.deadline is not None and time.time() > self.deadline:
            outcome = await self.jobs.append(self.job_id, EventType.ERROR, TIMEOUT)
            if outcome is WriteOutcome.OK and not started and self.queue is not None:
                await self.queue.withdraw(self.job_id)  # no worker will ever need it
            return None  # the timeout event itself arrives through the stream
        if started or self.queue is None:
            return None
        data = {"job_id": self.job_id, **await self.queue.report(self.job_id)}
        return status_event(EventType.QUEUED, data)

    async def events(self, after: str = START_ID) -> AsyncIterator[JobEvent]:
        """The job's events one at a time (`batches`, flattened)."""
        async for batch in self.batches(after):
            for event in batch:
                yield event

    async def batches(self, after: str = START_ID) -> AsyncIterator[list[JobEvent]]:
        """The job's events after `after`, as read together, plus status events."""
        last_id, started, failing_since = after, after != START_ID, 0.0

        def wait() -> int | None:  # asked before each wait: `started` as it is then
            return self.wait_ms(started)

        if after == START_ID and self.first is not None:
            yield [self.first]
            last_id = self.first.id
        while True:
            try:
                async for batch in self.jobs.read_batches(
                    self.job_id, after=last_id, block_ms=wait
                ):
                    if shutting_down() and not (batch and batch[-1].terminal):
                        yield [
                            *(batch or []),
                            status_event(EventType.ERROR, shutdown_data(self.job_id)),
                        ]
                        return
                    failing_since = 0.0
                    if batch is None:
                        status = await self.idle_status(started)
                        if status is not None:
                            yield [status]
                        continue
                    last_id = batch[-1].id
                    started = started or any(e.event != EventType.QUEUED for e in batch)
                    yield batch
                return
            except JobVanishedError:
                log.warning("job=%s: its stream vanished (Redis lost its data)", self.job_id)
                yield [status_event(EventType.ERROR, JOB_LOST)]
                return
            except REDIS_ERRORS as exc:
                # A lane of the shared read (mux.py) retried before it failed: the
                # grace counts from its first failure, not a second one from now.
                since = exc.since if isinstance(exc, ReadsFailedError) else time.monotonic()
                failing_since = min(failing_since or since, since)
                if time.monotonic() - failing_since > self.settings.redis_grace_seconds:
                    log.warning("job=%s stream gave up on Redis: %s", self.job_id, brief(exc))
                    yield [status_event(EventType.ERROR, REDIS_LOST)]
                    return
                await asyncio.sleep(0.25)


#: Claims kept for a client that may come back (Relay.grace), until they are dropped.
_PARKED: set[asyncio.Task[None]] = set()


def release_later(relay: Relay) -> None:
    """The client dropped mid-stream: keep its claim on the job for `relay.grace`
    seconds, then drop it (release). A client that reconnects in time (Last-Event-ID)
    takes a claim of its own first, so dropping this one leaves the job running.

    The claim stays held by this process meanwhile, under its lease: if the process
    dies or stops, another one drops it when the lease lapses (api/leases.py), as
    for any reader of a dead process."""
    task = asyncio.get_running_loop().create_task(_release_after(relay, relay.grace))
    _PARKED.add(task)
    task.add_done_callback(_PARKED.discard)


async def _release_after(relay: Relay, delay: float) -> None:
    await asyncio.sleep(delay)
    if not shutting_down():  # a stopping process leaves its claims to the lease
        await release(relay)


async def release(relay: Relay) -> None:
    """The client left: drop its claim on the job, which stops the job unless other
    readers share it. Shielded, so the cancellation that ended the request does not
    abort this too."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
        try:
            outcome = await relay.jobs.cancel(relay.job_id, release=True)
            if outcome is CancelOutcome.CANCELLED and relay.queue is not None:
                await relay.queue.withdraw(relay.job_id)
            log.info("job=%s client disconnected; %s", relay.job_id, outcome.value)
        except REDIS_ERRORS as exc:
            log.warning("job=%s could not request cancel: %s", relay.job_id, exc)


async def stop(relay: Relay) -> None:
    """End a job outright, readers or not (a request that started it failed before
    anyone had its id): cancelled, and off the queue if no worker has it yet."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
        try:
            outcome = await relay.jobs.cancel(relay.job_id)
            if outcome is CancelOutcome.CANCELLED and relay.queue is not None:
                await relay.queue.withdraw(relay.job_id)
        except REDIS_ERRORS as exc:
            log.warning("job=%s could not request cancel: %s", relay.job_id, exc)


async def relay_events(
    relay: Relay, converter: Converter, after: str = START_ID
) -> AsyncIterator[bytes]:
    """One job's events, each turned into SSE events by `convert`, to the terminal
    one. Owns the cleanup: a client leaving mid-stream releases the job.

    Events read together are encoded into one chunk: one send, one socket write.
    A relay that keeps up sends one event per chunk; one that falls behind (a
    thousand streams on one process) catches up in fewer, larger writes."""
    finished = False
    try:
        if after != START_ID:
            converter.catch_up(await relay.jobs.history(relay.job_id, until=after))
        async for batch in relay.batches(after):
            finished = batch[-1].terminal
            chunk = b"".join(sse.encode() for e in batch for sse in converter.convert(e))
            if chunk:
                yield chunk
    except BaseException:  # CancelledError / GeneratorExit: the client went away
        if relay.cancel_on_disconnect and not finished and not shutting_down():
            if relay.grace > 0:
                release_later(relay)
            else:
                await release(relay)
        raise


async def stream_job_events(
    relay: Relay, after: str = START_ID, split_thinking: bool = True, named: bool = False
) -> AsyncIterator[bytes]:
    """The native SSE stream (NativeEvents); `named`: ids name the job too."""
    converter = NativeEvents(split_thinking, relay.job_id if named else None)
    async for chunk in relay_events(relay, converter, after):
        yield chunk


async def collect_events(
    relay: Relay, is_disconnected: Callable[[], Awaitable[bool]]
) -> list[JobEvent] | None:
    """All of a job's stored events, for a non-streaming answer, and the error that
    ended the read if the relay made it up itself (Redis lost, the job's stream gone,
    this process shutting down: a terminal event with no id); None if the client
    left first (its claim on the job is then released). Queue-position reports are
    left out."""
    events: list[JobEvent] = []

    async def gather() -> None:
        async for event in relay.events():
            if event.id or event.terminal:
                events.append(event)

    task = asyncio.create_task(gather())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await is_disconnected():
            task.cancel()
            if relay.cancel_on_disconnect:
                await release(relay)
            return None
    task.result()
    if events and not events[-1].id:
        # The read ended, the job did not: nobody will read the rest of it (the
        # client gets a 503 and asks again), so it stops as if its client had left,
        # and the answer says to retry rather than to resume a stream it never had.
        if relay.cancel_on_disconnect:
            await release(relay)
        if events[-1].data == shutdown_data(relay.job_id):
            events[-1] = status_event(EventType.ERROR, SHUTDOWN_UNSTREAMED)
    return events
