"""A worker's side of a job stream: one job's events for one attempt (EventWriter),
and the thread that sends gathered tokens (StreamFlusher).

Cost per token. Every write is one APPEND_SCRIPT call; TTLs are refreshed only
every TTL_REFRESH_SECONDS (and with the claim and the last event). Within
STREAM_FLUSH_MS (default 50) a worker process gathers the tokens all its jobs
have ready and sends them together: one script call per slot, one round trip
per Redis node, one stream entry per job (a run of tokens, scripts.NewEvent).
An attempt's first token and its other events go at once: time to first token
is never traded away.

Ids chosen here. A worker picks each event's stream id itself, ascending
(`<ms>-<n>`, from its clock, above the last id it has seen), instead of letting
Redis pick ('*'). So the same write sent twice lands once (the script skips an id
already in the stream): a write whose reply was lost is simply sent again.

Failover. Replication is asynchronous: a master can acknowledge a write and die
before its replica has it. The promoted replica then holds the stream up to some
earlier entry, and state changes made in that window are lost with it: this
attempt's last few events, its claim, or a cancel request made in those last
milliseconds (the job then runs on, as if the cancel came too late). Replicas
apply the stream in order, so what is lost is always a tail. The writer keeps the
events it wrote (at most a stream's MAXLEN), and before it writes again after an
error, or once its job's slot is served by another node, it reads the stream's
last id and first writes again, with their own ids, the events the stream lacks
(and its claim, if that was lost). Readers that already saw those ids skip them;
nothing is lost or doubled. (A job created in that window, before any worker
wrote to it, is lost as a whole: its readers end with `redis_unavailable`.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from redis.cluster import RedisCluster

from textstream import keys
from textstream.connections import TRANSIENT, SyncStreamsClient
from textstream.transport.events import JobEvent, WriteOutcome, id_key, parse_entries, parse_entry
from textstream.transport.scripts import (
    APPEND_SCRIPT,
    EventType,
    NewEvent,
    append_args,
    as_text,
    job_reply,
    new_event,
)

log = logging.getLogger(__name__)

#: The longest a job's keys go without a TTL refresh while it runs.
TTL_REFRESH_SECONDS = 60.0

#: The most events one gathered script call carries (more jobs go in more calls of
#: the same round trip): a script holds Redis for all its other clients while it
#: runs, about 5 µs per event.
MAX_EVENTS_PER_CALL = 512

#: Between two tries of a write, or of Redis, during an outage.
RETRY_PAUSE_SECONDS = 0.25


class EventWriter:
    """Appends one job's events for one worker attempt (`owner`): used from ModelQ's
    worker threads, synchronously (a write returns once Redis has it), except
    tokens when a `flusher` gathers them (they go within STREAM_FLUSH_MS).

    Each write reports the job's state. When tokens produce no text for a while
    (held-back bytes, special tokens), `should_stop` reads the state itself at most
    every `poll_seconds`, so a cancel is never missed for long.

    A write that fails on the connection is retried for up to `grace` seconds
    (Redis restarting, a failover); its ids keep the retry from appending the same
    event twice.
    """

    def __init__(
        self,
        client: SyncStreamsClient,
        job_id: str,
        *,
        owner: str,
        ttl: int,
        maxlen: int,
        poll_seconds: float = 0.05,
        grace: float = 0.0,
        flusher: StreamFlusher | None = None,
    ) -> None:
        self._client = client
        self.job_id = job_id
        self._keys = [keys.job_events(job_id), keys.job_state(job_id)]
        self._script = client.register_script(APPEND_SCRIPT)
        self.owner = owner
        self._ttl = ttl
        self._refresh_every = min(TTL_REFRESH_SECONDS, ttl / 4)
        self._refreshed_at = -float("inf")
        self._maxlen = maxlen
        self._poll_seconds = poll_seconds
        self._checked_at = time.monotonic()
        self._grace = grace
        self._flusher = flusher
        self._lock = threading.Lock()  # guards _pending, _claim_pending, _last_id
        self._send_lock = threading.Lock()  # one batch in flight, in order
        self._pending: list[NewEvent] = []
        self._extendable = False  # the last pending event was never sent: a run may grow
        self._written_tokens = False  # this attempt sent a token (later ones may wait)
        self._claim_pending = False
        self._written: list[NewEvent] = []  # acknowledged, for a replay after a failover
        self._claim_id: str | None = None
        self._last_id: tuple[int, int] | None = None  # the stream's last id, as we know it
        self._node: str | None = None  # the cluster node our last write went to
        self.failure: BaseException | None = None  # a gathered send that gave up
        self.outcome = WriteOutcome.OK

    # -- reading -------------------------------------------------------------------

    def refresh(self) -> WriteOutcome:
        """Read the job's state without writing (what a write would have reported).
        While Redis is away the job goes on as it was: the writes wait the outage out
        (within the grace period) and report, or fail the job, themselves."""
        try:
            terminal, owner, cancel = self._client.hmget(
                self._keys[1], "terminal", "owner", "cancel"
            )
        except TRANSIENT:
            self._checked_at = time.monotonic()
            return self.outcome
        if terminal:
            self.outcome = WriteOutcome.CLOSED
        elif owner is not None and as_text(owner) != self.owner:
            self.outcome = WriteOutcome.STOLEN
        elif cancel:
            self.outcome = WriteOutcome.CANCEL
        self._checked_at = time.monotonic()
        return self.outcome

    def history(self) -> list[JobEvent]:
        """Every event the job has so far (a takeover resumes from these)."""
        events = parse_entries(self._client.xrange(self._keys[0]))
        with self._lock:
            self._seen(events[-1].id if events else None)
        return events

    @property
    def should_stop(self) -> bool:
        if (
            self.outcome is WriteOutcome.OK
            and time.monotonic() - self._checked_at > self._poll_seconds
            and not self._pending  # its flush reports the state within the window
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

    # -- writing -------------------------------------------------------------------

    def write(
        self,
        event: EventType,
        data: dict[str, Any],
        token_ids: Sequence[int] = (),
        *,
        claim: bool = False,
    ) -> WriteOutcome:
        """Append an event; returns the job's state as of the latest write Redis
        answered. A gathered token returns at once, before it is sent."""
        if self.failure is not None:
            raise self.failure
        if self._last_id is None:
            self._seen(self._top(last_event=True))  # ids above the stream's last one
        self.enqueue(event, data, token_ids, claim=claim)
        if (
            self._flusher is not None
            and event is EventType.TOKEN
            and not claim
            and self._written_tokens
        ):
            self._flusher.schedule(self)
            return self.outcome
        # The first token goes at once (what a client waits for longest), as do a
        # claim and every event that is not a token.
        self._written_tokens = self._written_tokens or event is EventType.TOKEN
        return self.flush()

    def enqueue(
        self,
        event: EventType,
        data: dict[str, Any],
        token_ids: Sequence[int] = (),
        *,
        claim: bool = False,
    ) -> None:
        """Add an event to what is pending, with its id, without sending it."""
        with self._lock:
            last = self._pending[-1] if self._pending else None
            run_end = last.last_key if last is not None and last.extensible else None
            if (
                event is EventType.TOKEN
                and not claim
                and self._extendable
                and last is not None
                and run_end is not None
                and run_end == self._last_id  # no id seen above it since
            ):
                # Tokens that wait together go in one entry (NewEvent.count): the
                # next token takes the id after the run's last, whatever the clock
                # says, so that every token of the run keeps an id of its own.
                self._last_id = (run_end[0], run_end[1] + 1)
                self._pending[-1] = last.extended(new_event(event, data, token_ids))
                return
            # Without the stream's last id (it could not be read), ids come from this
            # host's clock; the script writes one not above the stream's as '*'.
            self._pending.append(new_event(event, data, token_ids, self._next_id()))
            self._claim_pending = self._claim_pending or claim
            self._extendable = True

    def has_pending_end(self) -> bool:
        """Whether the job's last event (done, error) waits among the unsent ones."""
        with self._lock:
            return any(e.terminal for e in self._pending)

    def flush(self) -> WriteOutcome:
        """Send what is pending now (in the calling thread)."""
        with self._send_lock:
            batch, claim = self._take()
            if batch:
                self._send(batch, claim)
        if self.failure is not None:
            raise self.failure
        return self.outcome

    def _take(self) -> tuple[list[NewEvent], bool]:
        with self._lock:
            batch, self._pending = self._pending, []
            claim, self._claim_pending = self._claim_pending, False
        return batch, claim

    def _give_back(self, batch: list[NewEvent], claim: bool, exc: BaseException) -> None:
        """A batch that could not be sent goes back in front of what is pending, and
        the writer fails: a later write must never land after a gap (its ids are
        kept, so a copy of the batch that Redis runs late is skipped)."""
        with self._lock:
            # What was handed to Redis may be in the stream under its id already:
            # never grow it into a different entry.
            self._extendable = self._extendable and bool(self._pending)
            self._pending = batch + self._pending
            self._claim_pending = self._claim_pending or claim
        self.failure = self.failure or exc

    def recover(self) -> None:
        """Clear a failure, to try again once Redis is back: the next write sends
        first what could not be sent."""
        self.failure = None

    def _next_id(self) -> str:
        """An id above every id this writer has seen, from this host's clock."""
        now = time.time_ns() // 1_000_000
        ms, seq = self._last_id or (0, 0)
        self._last_id = (now, 0) if now > ms else (ms, seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    def _seen(self, entry_id: str | None) -> None:
        if entry_id is not None and id_key(entry_id) > (self._last_id or (0, -1)):
            self._last_id = id_key(entry_id)
        elif self._last_id is None:
            self._last_id = (0, 0)

    def _top(self, *, last_event: bool = False) -> str | None:
        """The id of the stream's last entry, or of its last event (a run's last
        token's id is above its entry's)."""
        last = self._client.xrevrange(self._keys[0], count=1)
        if not last:
            return None
        return parse_entry(*last[0])[-1].id if last_event else as_text(last[0][0])

    def call_args(self, batch: list[NewEvent], claim: bool) -> list[str | int]:
        terminal = any(e.terminal for e in batch)
        refresh = claim or terminal or time.monotonic() - self._refreshed_at >= self._refresh_every
        if refresh:
            self._refreshed_at = time.monotonic()
        ttl = self._ttl if refresh else None
        return append_args(batch, maxlen=self._maxlen, ttl=ttl, owner=self.owner, claim=claim)

    def _send(self, batch: list[NewEvent], claim: bool) -> None:
        """Send one batch (the caller holds the send lock): retried within the grace
        period; after an error or a change of node, first restore what a failover
        may have lost. A send that gives up is raised, and kept in `failure`."""
        give_up = time.monotonic() + self._grace
        resync = False
        while True:
            try:
                node = self.node()
                if resync or (self._node is not None and node != self._node):
                    batch, claim = self._unwritten(batch, claim)
                    resync = False
                if not batch:
                    return
                (reply,) = self._script(keys=self._keys, args=self.call_args(batch, claim))
                break
            except TRANSIENT as exc:
                resync = True
                if time.monotonic() >= give_up:
                    self._give_back(batch, claim, exc)
                    raise
                time.sleep(RETRY_PAUSE_SECONDS)
        self.accept(batch, claim, reply, node)

    def accept(self, batch: list[NewEvent], claim: bool, reply: list[Any], node: str) -> None:
        """Take in APPEND_SCRIPT's answer to `batch` (this job's part of it)."""
        text, last, _ = job_reply(reply)
        outcome = WriteOutcome(text)
        if outcome in (WriteOutcome.OK, WriteOutcome.CANCEL):
            if outcome is WriteOutcome.CANCEL:  # the script skipped what came after
                batch = [e for e in batch if last and id_key(e.id) <= id_key(last)]
            self._written += batch
            if claim and batch:
                self._claim_id = batch[0].id
            with self._lock:
                self._seen(last or None)  # "": every event skipped (cancelled)
            self._node = node
        self.outcome = outcome
        self._checked_at = time.monotonic()

    def node(self) -> str:
        """The cluster node serving this job's slot ("" on one Redis)."""
        if isinstance(self._client, RedisCluster):
            return str(self._client.get_node_from_key(self._keys[0]).name)
        return ""

    def _unwritten(self, batch: list[NewEvent], claim: bool) -> tuple[list[NewEvent], bool]:
        """`batch`, preceded by this attempt's acknowledged events that the stream no
        longer has (a failover lost its tail), with the claim if that went too."""
        top = self._top()
        if top is None:  # the job is gone (Redis lost everything): nothing to restore
            return batch, claim
        last = id_key(top)
        lost = [e for e in self._written if id_key(e.id) > last]
        if not lost:
            return batch, claim
        log.warning(
            "job=%s: the stream lost %d acknowledged event(s) (a failover); writing them again",
            self.job_id,
            len(lost),
        )
        self._written = self._written[: len(self._written) - len(lost)]
        claim_lost = self._claim_id is not None and id_key(self._claim_id) > last
        return lost + batch, claim or claim_lost


Taken = tuple[EventWriter, list[NewEvent], bool]  # a writer, its batch, its claim


class StreamFlusher:
    """Sends gathered tokens for every EventWriter of a worker process, together.

    The first token gathered opens a window of STREAM_FLUSH_MS; when it ends, every
    writer with tokens pending is sent at once: one APPEND_SCRIPT call carries the
    batches of all jobs that share a slot (all of them, on one Redis), and the calls
    for one Redis node share one round trip. A token waits at most the window. A
    writer whose batch fails there is sent again on its own, with its retries."""

    def __init__(self, client: SyncStreamsClient, flush_ms: int) -> None:
        self._client = client
        self._window = flush_ms / 1000
        self._waiting: dict[EventWriter, None] = {}  # an ordered set
        self._closes_at = 0.0
        self._cond = threading.Condition()
        self._script = client.register_script(APPEND_SCRIPT)
        self._thread = threading.Thread(target=self._run, name="stream-flusher", daemon=True)
        self._thread.start()

    def schedule(self, writer: EventWriter) -> None:
        with self._cond:
            if not self._waiting:
                self._closes_at = time.monotonic() + self._window
                self._cond.notify()
            self._waiting[writer] = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                while (left := self._closes_at - time.monotonic()) > 0:
                    self._cond.wait(left)
                ready, self._waiting = list(self._waiting), {}
            try:
                self._send_together(ready)
            except Exception:  # never let the thread die: writers retry on their own
                log.exception("stream flusher: a round failed")

    def _send_together(self, writers: list[EventWriter]) -> None:
        taken: list[Taken] = []
        for writer in writers:
            if not writer._send_lock.acquire(blocking=False):
                self.schedule(writer)  # it is sending now; what it has not taken waits
                continue
            batch, claim = writer._take()
            if batch:
                taken.append((writer, batch, claim))
            else:
                writer._send_lock.release()
        try:
            for group in self._by_node(taken).values():
                self._pipeline(group)
        finally:
            for writer, _, _ in taken:
                writer._send_lock.release()

    def _by_node(self, taken: list[Taken]) -> dict[str, list[Taken]]:
        groups: dict[str, list[Taken]] = {}
        for item in taken:
            try:
                node = item[0].node()
            except TRANSIENT:
                node = "?"
            groups.setdefault(node, []).append(item)
        return groups

    def _pipeline(self, group: list[Taken]) -> None:
        """One round trip for the node's jobs, one script call per slot among them;
        whatever fails there goes again on its own."""
        replies: list[Any] = [None] * len(group)
        node = "?"
        try:
            node = group[0][0].node()
            if all(writer._node in (None, node) for writer, _, _ in group) and node != "?":
                replies = self._call(node, group)
        except TRANSIENT as exc:
            # Wait the outage out once for the whole group (not a grace period per
            # writer, one after another): past it, every job of the group fails.
            grace = max(writer._grace for writer, _, _ in group)
            if not self._answers_within(group[0][0]._keys[1], grace):
                for writer, batch, claim in group:
                    writer._give_back(batch, claim, exc)
                return
        except Exception as exc:  # not an outage: these jobs fail, their events kept
            for writer, batch, claim in group:
                writer._give_back(batch, claim, exc)
            return
        for (writer, batch, claim), reply in zip(group, replies, strict=True):
            try:
                if isinstance(reply, list):
                    writer.accept(batch, claim, reply, node)
                else:
                    writer._send(batch, claim)
            except Exception as exc:  # kept in writer.failure, raised on its next write
                writer.failure = writer.failure or exc

    def _answers_within(self, key: str, seconds: float) -> bool:
        """Whether the Redis serving `key` answers within `seconds` (asked through
        the client, which follows a cluster's failover to the promoted replica)."""
        give_up = time.monotonic() + seconds
        while True:
            try:
                self._client.exists(key)
                return True
            except TRANSIENT:
                if time.monotonic() >= give_up:
                    return False
                time.sleep(RETRY_PAUSE_SECONDS)

    def _call(self, node: str, group: list[Taken]) -> list[Any]:
        """Each job's part of the replies, in `group`'s order (an exception in
        place of the parts of a call that failed)."""
        client: Any = self._client
        slots: dict[int, list[int]] = {}  # slot -> indexes into group
        if isinstance(client, RedisCluster):
            for index, (writer, _, _) in enumerate(group):
                slots.setdefault(client.keyslot(writer._keys[0]), []).append(index)
            client = client.get_redis_connection(client.get_node(node_name=node))
        else:
            slots[0] = list(range(len(group)))
        calls: list[list[int]] = []  # indexes into group, one list per script call
        for indexes in slots.values():  # a call never spans two slots
            call: list[int] = []
            events = 0
            for index in indexes:
                size = len(group[index][1])
                if call and events + size > MAX_EVENTS_PER_CALL:
                    calls.append(call)
                    call, events = [], 0
                call.append(index)
                events += size
            if call:
                calls.append(call)
        pipe = client.pipeline(transaction=False)
        for call in calls:
            call_keys: list[str] = []
            call_args: list[str | int] = []
            for index in call:
                writer, batch, claim = group[index]
                call_keys += writer._keys
                call_args += writer.call_args(batch, claim)
            self._script(keys=call_keys, args=call_args, client=pipe)
        replies: list[Any] = [None] * len(group)
        for call, reply in zip(calls, pipe.execute(raise_on_error=False), strict=True):
            for index, part in zip(call, reply if isinstance(reply, list) else [], strict=False):
                replies[index] = part
        return replies
