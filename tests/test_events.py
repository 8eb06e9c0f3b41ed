"""The job stream reader against a real Redis: the race where an empty blocking
read is handled only after the job has meanwhile ended, the multiplexer that
serves every relay's blocking reads with one XREAD (mux.py), and the worker's
writer (writer.py): a write sent twice lands once, events a failover lost are
written again under their ids, gathered tokens go in one call, TTLs are refreshed
without a write per token."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from helpers import stored_events, wait_for

from textstream import keys
from textstream.api.relay.job_events import CancelOutcome, JobEvents, ReaderClaims, ResumePoint
from textstream.api.relay.mux import ReadMux
from textstream.transport import scripts as scripts_module
from textstream.transport.events import EventType, WriteOutcome, id_key
from textstream.worker import writer as writer_module
from textstream.worker.writer import EventWriter, StreamFlusher

DONE = {"finish_reason": "length", "model": "m", "usage": {}}


def n(entry: tuple[bytes, list[bytes]]) -> bytes:
    """The `n` field of a raw entry (the multiplexer passes Redis's flat field list)."""
    fields = entry[1]
    return dict(zip(fields[::2], fields[1::2], strict=True))[b"n"]


def test_reader_keeps_events_written_while_an_empty_reply_was_pending(redis_url):
    """The first blocking read returns empty, and only then the job runs to its end:
    what a CPU-starved API process sees when the empty reply sits unread while the
    worker writes everything."""

    async def scenario() -> list[str]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        job_id = "late" + "0" * 28
        await client.delete(keys.job_events(job_id), keys.job_state(job_id))
        await jobs.append(job_id, EventType.QUEUED, {"job_id": job_id})

        async def finish() -> None:
            await jobs.append(job_id, EventType.STARTED, {"worker": "w"})
            await jobs.append(job_id, EventType.TOKEN, {"text": " hi"})
            await jobs.append(job_id, EventType.DONE, DONE)

        read = jobs.mux.read
        pending: list[Callable[[], Awaitable[None]]] = [finish]

        async def late_empty_read(key: str, last_id: str, block_ms: int) -> list:
            entries = await read(key, last_id, block_ms)
            if not entries and pending:
                await pending.pop()()
            return entries

        jobs.mux.read = late_empty_read  # type: ignore[method-assign]
        names = []
        async for batch in jobs.read_batches(job_id, block_ms=50):
            names += [event.event for event in batch or ()]
        await jobs.close()
        await client.close()
        return names

    assert asyncio.run(scenario()) == ["queued", "started", "token", "done"]


def test_reading_after_the_last_event_of_an_ended_job_returns_at_once(redis_url):
    async def scenario() -> list[object]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        job_id = "ended" + "0" * 27
        await jobs.append(job_id, EventType.QUEUED, {"job_id": job_id})
        await jobs.append(job_id, EventType.ERROR, {"error": {"type": "cancelled"}})
        last = (await jobs.history(job_id))[-1].id
        seen = [b async for b in jobs.read_batches(job_id, after=last, block_ms=5000)]
        await jobs.close()
        await client.close()
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 2)) == []


def test_mux_serves_many_readers_each_its_own_entries(redis_url):
    """Readers of 50 streams, two of them on one stream from different ids, all
    blocked at once: each gets exactly the entries after its own id."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        mux = ReadMux(client)
        keys = [f"mux-test:{i}" for i in range(50)]
        await client.delete(*keys)
        first = await client.xadd(keys[0], {"n": "0"})
        readers = [asyncio.create_task(mux.read(key, "0-0", 5000)) for key in keys]
        late = asyncio.create_task(mux.read(keys[0], first.decode(), 5000))
        await asyncio.sleep(0.05)
        for i, key in enumerate(keys):
            await client.xadd(key, {"n": str(i + 1)})
        got = await asyncio.gather(*readers)
        # It was there before reading (and the next one too, if the read came late).
        assert [n(e) for e in got[0]] in ([b"0"], [b"0", b"1"])
        assert [[n(e) for e in entries] for entries in got[1:]] == [
            [str(i + 1).encode()] for i in range(1, 50)
        ]
        assert [n(e) for e in await late] == [b"1"]
        await mux.close()
        await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_mux_wakes_its_blocked_read_for_a_new_reader(redis_url):
    """A reader arriving while the XREAD blocks on other streams is served at once,
    not after the read's one-second block runs out."""
    waited, woken = asyncio.run(asyncio.wait_for(wait_for_new_reader(redis_url), 10))
    assert woken and waited < ReadMux.BLOCK_MS / 1000 / 4


def test_mux_polls_in_short_blocks_where_client_commands_are_refused(redis_url):
    """A Redis user without CLIENT (a locked-down ACL) still gets its reads: the mux
    notices the refusal and blocks SHORT_BLOCK_MS at a time instead."""
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("ACL", "SETUSER", "noclient", "on", ">pw", "~*", "+@all", "-client")
    url = redis_url.replace("redis://", "redis://noclient:pw@")
    try:
        waited, woken = asyncio.run(asyncio.wait_for(wait_for_new_reader(url), 10))
    finally:
        admin.execute_command("ACL", "DELUSER", "noclient")
        admin.close()
    assert not woken and waited < ReadMux.BLOCK_MS / 1000 / 4


async def wait_for_new_reader(url: str) -> tuple[float, bool]:
    """How long a reader of a stream that already has an entry waits, when it joins
    while the mux is blocked on another stream; and whether the mux woke its read."""
    client = aioredis.Redis.from_url(url)
    mux = ReadMux(client)
    await client.delete("mux-idle", "mux-busy")
    idle = asyncio.create_task(mux.read("mux-idle", "0-0", 5000))
    await asyncio.sleep(0.1)  # the loop is now blocked on mux-idle alone
    await client.xadd("mux-busy", {"n": "1"})
    started = time.perf_counter()
    entries = await mux.read("mux-busy", "0-0", 5000)
    waited = time.perf_counter() - started
    assert [n(e) for e in entries] == [b"1"]
    idle.cancel()
    await mux.close()
    await client.close()
    return waited, mux.wakes_reads


def test_mux_times_out_empty_and_reports_a_lost_redis(redis_url, tmp_path):
    from bench.cluster import start_redis

    async def timeout() -> list:
        client = aioredis.Redis.from_url(redis_url)
        mux = ReadMux(client)
        entries = await mux.read("mux-nothing", "0-0", 100)
        await mux.close()
        await client.close()
        return entries

    assert asyncio.run(asyncio.wait_for(timeout(), 5)) == []

    proc, url = start_redis(tmp_path)

    async def outage() -> BaseException | None:
        client = aioredis.Redis.from_url(url, socket_timeout=3)
        mux = ReadMux(client)
        reader = asyncio.create_task(mux.read("mux-gone", "0-0", 3000))
        await asyncio.sleep(0.2)
        proc.kill()
        try:
            await reader
        except Exception as exc:
            return exc
        finally:
            await mux.close()
        return None

    error = asyncio.run(asyncio.wait_for(outage(), 10))
    proc.wait()
    assert isinstance(error, aioredis.ConnectionError), error


# --- the worker's writer ---------------------------------------------------------------


def fresh_job(client: redis.Redis, job_id: str) -> None:
    client.delete(keys.job_events(job_id), keys.job_state(job_id))
    client.xadd(keys.job_events(job_id), {"event": "queued", "data": "{}"})


def stream_events(client: redis.Redis, job_id: str) -> list[tuple[str, str]]:
    """A job's events as readers get them (a run of tokens split): (id, data)."""
    return [(e.id, e.raw) for e in stored_events(client, keys.job_events(job_id))]


def started_writer(client: redis.Redis, job_id: str, owner: str, tokens: int) -> EventWriter:
    """A fresh job that `owner` has claimed and written `tokens` tokens to."""
    fresh_job(client, job_id)
    writer = EventWriter(client, job_id, owner=owner, ttl=60, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    for i in range(tokens):
        writer.write(EventType.TOKEN, {"text": f" {i}"}, [i])
    return writer


def test_a_write_sent_again_after_a_lost_reply_lands_once(redis_client):
    job_id = "resend" + "0" * 26
    writer = started_writer(redis_client, job_id, "w/1", tokens=3)
    before = stream_events(redis_client, job_id)
    # The same batch again, as after a reply lost on the way back: nothing doubles.
    writer._send(writer._written[-2:], claim=False)
    assert stream_events(redis_client, job_id) == before
    assert writer.write(EventType.DONE, DONE) is WriteOutcome.OK
    assert len(stream_events(redis_client, job_id)) == len(before) + 1


def test_events_a_failover_lost_are_written_again_with_their_own_ids(redis_client):
    """Replication is asynchronous: a promoted replica may lack the last events its
    master acknowledged, and the claim with them. Before its next write the writer
    restores them, under the ids readers already saw, so nothing is lost or doubled."""
    job_id = "failover" + "0" * 24
    writer = started_writer(redis_client, job_id, "w/2", tokens=5)
    whole = stream_events(redis_client, job_id)
    # What the promoted replica holds: the stream up to its first entry (the claim
    # and 5 tokens lost), and a state from before the claim.
    first_id, first = redis_client.xrange(keys.job_events(job_id))[0]
    redis_client.delete(keys.job_events(job_id), keys.job_state(job_id))
    redis_client.xadd(keys.job_events(job_id), first, id=first_id)
    writer.node = lambda: "promoted-replica"  # type: ignore[method-assign]
    assert writer.write(EventType.TOKEN, {"text": " 5"}, [5]) is WriteOutcome.OK
    after = stream_events(redis_client, job_id)
    assert after[:-1] == whole
    assert after[-1][1] == '{"text": " 5"}'
    assert redis_client.hget(keys.job_state(job_id), "owner") == b"w/2"


def test_gathered_tokens_go_in_one_call_and_the_last_event_flushes_them(redis_client):
    job_id = "gather" + "0" * 26
    fresh_job(redis_client, job_id)
    flusher = StreamFlusher(redis_client, flush_ms=200)
    writer = EventWriter(redis_client, job_id, owner="w/3", ttl=60, maxlen=100, flusher=flusher)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    redis_client.config_resetstat()
    writer.write(EventType.TOKEN, {"text": " first"}, [9])
    assert len(stream_events(redis_client, job_id)) == 3  # the first token goes at once
    for i in range(5):
        writer.write(EventType.TOKEN, {"text": f" {i}"}, [i])
    assert len(stream_events(redis_client, job_id)) == 3  # gathered, not sent yet
    wait_for(lambda: len(stream_events(redis_client, job_id)) == 8, 5, "the window to end")
    calls = redis_client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert calls == 2  # the first token, then five tokens in one call
    # ... and one stream entry, a run, whose tokens keep ids of their own: consecutive,
    # the first one the entry's.
    entries = redis_client.xrange(keys.job_events(job_id))
    assert [f[b"event"] for _, f in entries] == [b"queued", b"started", b"token", b"tokens"]
    run = stream_events(redis_client, job_id)[3:]
    assert [json.loads(data)["text"] for _, data in run] == [f" {i}" for i in range(5)]
    assert run[0][0] == entries[-1][0].decode()
    first = id_key(run[0][0])
    assert [id_key(i) for i, _ in run] == [(first[0], first[1] + k) for k in range(5)]
    writer.write(EventType.TOKEN, {"text": " 5"}, [5])
    writer.write(EventType.DONE, DONE)  # sent at once, after the token it waited behind
    names = [e.event for e in stored_events(redis_client, keys.job_events(job_id))]
    assert names[-2:] == ["token", "done"] and len(names) == 10


def run_job(client: redis.Redis, job_id: str, tokens: int) -> list[str]:
    """A job whose first token goes at once and its other `tokens` - 1 in one run (a
    long window, then `done`): the ids of its events as readers get them."""
    fresh_job(client, job_id)
    flusher = StreamFlusher(client, flush_ms=10_000)
    writer = EventWriter(client, job_id, owner="w/5", ttl=60, maxlen=100, flusher=flusher)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    for i in range(tokens):
        writer.write(EventType.TOKEN, {"text": f" {i}"}, [i])
    writer.write(EventType.DONE, DONE)
    assert len(client.xrange(keys.job_events(job_id))) == 5  # queued, started, 0, run, done
    return [i for i, _ in stream_events(client, job_id)]


def test_a_reader_resumes_after_any_token_of_a_run(redis_url, redis_client):
    """Last-Event-ID may name a token inside a run: reading after it yields the run's
    other tokens, resume_point knows it, history stops at it; an id inside the run's
    millisecond that no token has is not an event."""
    job_id = "run" + "0" * 29
    ids = run_job(redis_client, job_id, 4)
    ms = id_key(ids[4])[0]  # the run's

    async def scenario() -> tuple[list[Any], list[ResumePoint], list[str]]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        try:
            rest = [
                e.data.get("text", e.event)
                async for batch in jobs.read_batches(job_id, after=ids[4])
                if batch
                for e in batch
            ]
            points = [
                await jobs.resume_point(job_id, entry_id)
                for entry_id in (ids[3], ids[4], ids[5], f"{ms}-999999", ids[-1])
            ]
            until = [e.id for e in await jobs.history(job_id, until=ids[4])]
        finally:
            await jobs.close()
            await client.close()
        return rest, points, until

    rest, points, until = asyncio.run(scenario())
    assert rest == [" 3", "done"]
    assert points == [ResumePoint.OPEN] * 3 + [ResumePoint.UNKNOWN, ResumePoint.ENDED]
    assert until == ids[:5]


def test_an_entry_after_a_run_takes_an_id_above_all_its_tokens(redis_client):
    """A run is stored under its first token's id; an entry added after it with an
    id from Redis (the API's timeout, a cancel) still comes after its last token."""
    job_id = "runthenstar" + "0" * 21
    fresh_job(redis_client, job_id)
    # Ids in one far millisecond, so that Redis's '*' would otherwise land among them.
    redis_client.xadd(keys.job_events(job_id), {"event": "status", "data": "{}"}, id="9" * 13)
    writer = EventWriter(redis_client, job_id, owner="w/8", ttl=60, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    for i in range(3):
        writer.enqueue(EventType.TOKEN, {"text": f" {i}"}, [i])
    writer.flush()
    redis_client.xadd(keys.job_events(job_id), {"event": "error", "data": "{}"})
    events = stored_events(redis_client, keys.job_events(job_id))
    assert [e.event for e in events[-4:]] == ["token", "token", "token", "error"]
    ids = [id_key(e.id) for e in events]
    assert ids == sorted(set(ids)) and ids[-1] == (int("9" * 13), 5)


@pytest.mark.parametrize("slipped_in_at", ["one of the run's ids", "above the run"])
def test_a_run_whose_ids_were_taken_keeps_every_token_above_the_stream(redis_client, slipped_in_at):
    """Another writer slipped an entry in at one of a run's ids, or above them all:
    the script writes the run's tokens singly, with ids from Redis, every id above
    the last."""
    job_id = "runfallback" + "0" * 21
    fresh_job(redis_client, job_id)
    writer = EventWriter(redis_client, job_id, owner="w/6", ttl=60, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    for i in range(3):
        writer.enqueue(EventType.TOKEN, {"text": f" {i}"}, [i])
    (run,) = writer._pending
    ms, seq = id_key(run.id)
    alien = f"{ms}-{seq + 1}" if slipped_in_at == "one of the run's ids" else f"{ms + 10**6}-5"
    redis_client.xadd(keys.job_events(job_id), {"event": "status", "data": "{}"}, id=alien)
    assert writer.flush() is WriteOutcome.OK
    events = stored_events(redis_client, keys.job_events(job_id))
    assert [e.event for e in events[-4:]] == ["status", "token", "token", "token"]
    assert [e.token_ids for e in events[-3:]] == [(0,), (1,), (2,)]
    ids = [id_key(e.id) for e in events]
    assert ids == sorted(set(ids))  # ascending, none twice


def test_a_run_that_was_handed_to_redis_never_grows(redis_client):
    """A batch that failed to send goes back in front of what is pending, and Redis
    may have it already under its id: a token that follows starts a new entry."""
    job_id = "rungiveback" + "0" * 21
    fresh_job(redis_client, job_id)
    writer = EventWriter(redis_client, job_id, owner="w/7", ttl=60, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    writer.enqueue(EventType.TOKEN, {"text": " 0"}, [0])
    writer.enqueue(EventType.TOKEN, {"text": " 1"}, [1])
    batch, claim = writer._take()
    writer._script(keys=writer._keys, args=writer.call_args(batch, claim))  # Redis ran it
    writer._give_back(batch, claim, ConnectionError("the reply was lost"))
    writer.recover()
    writer.enqueue(EventType.TOKEN, {"text": " 2"}, [2])
    assert writer.flush() is WriteOutcome.OK
    entries = redis_client.xrange(keys.job_events(job_id))
    assert [f[b"event"] for _, f in entries[2:]] == [b"tokens", b"token"]
    tokens = [e.data["text"] for e in stored_events(redis_client, keys.job_events(job_id))[2:]]
    assert tokens == [" 0", " 1", " 2"]  # each once


def gathering_writers(client: redis.Redis, prefix: str, count: int) -> list[EventWriter]:
    """`count` fresh jobs, each claimed by its own writer, all gathering into one
    StreamFlusher with a long (200 ms) window."""
    flusher = StreamFlusher(client, flush_ms=200)
    writers = []
    for n in range(count):
        job_id = f"{prefix}{n}".ljust(32, "0")
        fresh_job(client, job_id)
        writer = EventWriter(client, job_id, owner=f"w/{n}", ttl=60, maxlen=100, flusher=flusher)
        writer.history()
        writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
        writer.write(EventType.TOKEN, {"text": " -"}, [0])  # a first token goes at once
        writers.append(writer)
    return writers


def test_one_call_carries_every_jobs_tokens_and_a_closed_job_refuses_only_its_own(
    redis_client,
):
    writers = gathering_writers(redis_client, "many", 3)
    # Another worker ended the middle job meanwhile.
    redis_client.hset(keys.job_state(writers[1].job_id), "terminal", "error")
    redis_client.config_resetstat()
    for i in range(4):
        for writer in writers:
            writer.write(EventType.TOKEN, {"text": f" {i}"}, [i])
    wait_for(lambda: writers[1].outcome is WriteOutcome.CLOSED, 5, "the window to end")
    assert redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] == 1  # 12 tokens
    assert [len(stream_events(redis_client, w.job_id)) for w in writers] == [7, 3, 7]
    assert [w.outcome for w in writers] == [WriteOutcome.OK, WriteOutcome.CLOSED, WriteOutcome.OK]
    texts = [json.loads(d)["text"] for _, d in stream_events(redis_client, writers[2].job_id)[3:]]
    assert texts == [" 0", " 1", " 2", " 3"]


def test_a_big_round_is_split_into_calls_of_bounded_size(redis_client, monkeypatch):
    """A script holds Redis for everyone while it runs: a round of many events goes
    in several calls (one round trip), each job whole in one of them."""
    monkeypatch.setattr(writer_module, "MAX_EVENTS_PER_CALL", 4)
    monkeypatch.setattr(scripts_module, "MAX_TOKENS_PER_ENTRY", 1)  # a token per entry
    writers = gathering_writers(redis_client, "split", 3)
    redis_client.config_resetstat()
    for i in range(3):
        for writer in writers:
            writer.write(EventType.TOKEN, {"text": f" {i}"}, [i])
    wait_for(
        lambda: all(len(stream_events(redis_client, w.job_id)) == 6 for w in writers),
        5,
        "the window to end",
    )
    assert redis_client.info("commandstats")["cmdstat_evalsha"]["calls"] == 3  # 3 + 3 + 3 > 4


def test_two_identical_jobs_written_at_once_each_keep_their_own_tokens(redis_client):
    """Two identical requests (no cache) run at once in one worker: their tokens share
    the flusher's calls, and each stream gets exactly its own, once, in order."""
    writers = gathering_writers(redis_client, "twin", 2)
    go = threading.Barrier(2)

    def generate(writer: EventWriter) -> None:
        go.wait()
        for i in range(40):
            writer.write(EventType.TOKEN, {"text": f" {i}"}, [i])
            time.sleep(0.001)
        writer.write(EventType.DONE, DONE)

    threads = [threading.Thread(target=generate, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for writer in writers:
        events = stored_events(redis_client, keys.job_events(writer.job_id))
        names = [e.event for e in events]
        assert names == ["queued", "started"] + ["token"] * 41 + ["done"]
        texts = [e.data["text"] for e in events if e.event == "token"]
        assert texts == [" -"] + [f" {i}" for i in range(40)]
        ids = [id_key(e.id) for e in events]
        assert ids == sorted(set(ids))


def test_ttls_are_refreshed_by_the_claim_and_the_last_event_not_every_token(redis_client):
    job_id = "ttl" + "0" * 29
    fresh_job(redis_client, job_id)
    writer = EventWriter(redis_client, job_id, owner="w/4", ttl=600, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    assert 590 < redis_client.ttl(keys.job_events(job_id)) <= 600
    redis_client.expire(keys.job_events(job_id), 100)
    writer.write(EventType.TOKEN, {"text": " a"}, [1])
    assert redis_client.ttl(keys.job_events(job_id)) <= 100
    writer.write(EventType.DONE, DONE)
    assert 590 < redis_client.ttl(keys.job_events(job_id)) <= 600
    assert 590 < redis_client.ttl(keys.job_state(job_id)) <= 600


def test_after_a_cancel_neither_tokens_nor_done_are_written(redis_client):
    """A cancel that lands just before a job's last write: the script writes neither
    the tokens generated since nor `done` (which would read as a complete answer,
    and stay cached), and the worker then ends the job `cancelled`."""
    job_id = "cancelrace" + "0" * 22
    events_key, state_key = keys.job_events(job_id), keys.job_state(job_id)
    redis_client.xadd(events_key, {"event": "queued", "data": "{}"})
    writer = EventWriter(redis_client, job_id, owner="w/1", ttl=60, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    writer.write(EventType.TOKEN, {"text": " a"}, [1])
    redis_client.hset(state_key, "cancel", "1")  # CANCEL_SCRIPT, for a job with an owner
    assert writer.write(EventType.TOKEN, {"text": " b"}, [2]) is WriteOutcome.CANCEL
    assert writer.write(EventType.DONE, {"finish_reason": "length"}) is WriteOutcome.CANCEL
    assert redis_client.hget(state_key, "terminal") is None
    writer.write(EventType.ERROR, {"error": {"type": "cancelled", "message": "x"}})
    names = [f[b"event"] for _, f in redis_client.xrange(events_key)]
    assert names == [b"queued", b"started", b"token", b"error"]
    assert redis_client.hget(state_key, "terminal") == b"error"


def test_nothing_is_written_after_a_jobs_last_event_in_one_batch(redis_client):
    """`done` and an `error` pending together (a `done` given back after an outage,
    then the outage's error): only the first end is written."""
    job_id = "twoends" + "0" * 25
    events_key = keys.job_events(job_id)
    redis_client.xadd(events_key, {"event": "queued", "data": "{}"})
    writer = EventWriter(redis_client, job_id, owner="w/1", ttl=60, maxlen=100)
    writer.history()
    writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
    writer.enqueue(EventType.DONE, {"finish_reason": "length"})
    writer.enqueue(EventType.ERROR, {"error": {"type": "redis_unavailable", "message": "x"}})
    assert writer.has_pending_end()
    writer.flush()
    names = [f[b"event"] for _, f in redis_client.xrange(events_key)]
    assert names == [b"queued", b"started", b"done"]
    assert redis_client.hget(keys.job_state(job_id), "terminal") == b"done"


def test_create_returns_the_queued_event_as_stored_and_never_touches_an_existing_job(
    redis_url, redis_client
):
    """A submission's relay starts from what `create` returns instead of reading it
    back, so it must be exactly the stored event; a job id already taken gets None
    and its stream and state stay as they were."""
    job_id = "c" * 32
    redis_client.delete(keys.job_events(job_id), keys.job_state(job_id))

    async def scenario() -> tuple[Any, Any]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        try:
            data = {"job_id": job_id, "position": 3, "note": "é ✓"}
            first = await jobs.create(job_id, data, tenant="key-a", model="m")
            again = await jobs.create(job_id, {"job_id": job_id}, tenant="key-b", model="m")
            return first, again
        finally:
            await client.close()

    first, again = asyncio.run(scenario())
    (stored,) = stored_events(redis_client, keys.job_events(job_id))
    assert first == stored
    assert again is None
    assert redis_client.hget(keys.job_state(job_id), "tenant") == b"key-a"


def test_reader_claims_are_counted_per_api_process(redis_url):
    """Two API processes' readers share a job (the response cache). Dropping a dead
    process's claims leaves the other's; a process that holds no claim any more
    (reaped while it lived) takes no one else's away when its client leaves; the
    last claim leaving cancels the job."""

    async def scenario() -> list[CancelOutcome]:
        client = aioredis.Redis.from_url(redis_url)
        first = JobEvents(client, ttl=60, maxlen=100, claims=ReaderClaims("proc-a", 60))
        second = JobEvents(client, ttl=60, maxlen=100, claims=ReaderClaims("proc-b", 60))
        job_id = "claim" + "0" * 27
        await client.delete(keys.job_events(job_id), keys.job_state(job_id))
        await first.create(job_id, {"job_id": job_id}, tenant="", reader=True)
        await second.track(job_id, reader=True)
        outcomes = [
            await second.release_all(job_id, "proc-a"),  # a's lease lapsed: reaped
            await second.release_all(job_id, "proc-a"),  # reaped twice: nothing left
            await first.cancel(job_id, release=True),  # a's client leaves after all
            await second.cancel(job_id, release=True),  # the last reader leaves
        ]
        await first.close()
        await second.close()
        await client.close()
        return outcomes

    shared, cancelled = CancelOutcome.SHARED, CancelOutcome.CANCELLED
    assert asyncio.run(scenario()) == [shared, shared, shared, cancelled]
