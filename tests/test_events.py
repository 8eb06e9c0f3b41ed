"""The job stream reader against a real Redis: the race where an empty blocking
read is handled only after the job has meanwhile ended, and the multiplexer that
serves every relay's blocking reads with one XREAD (mux.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import redis
import redis.asyncio as aioredis

from textstream.transport.events import EventType, JobEvents
from textstream.transport.mux import ReadMux

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
        await client.delete(f"textstream:job:{job_id}:events", f"textstream:job:{job_id}:state")
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
        assert [n(e) for e in got[0]] == [b"0"]  # it was there before reading
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
