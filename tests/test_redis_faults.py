"""Redis going away under a running API and workers, and coming back."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from conftest import Service
from helpers import free_port, service_env, stored_events, stream, wait_for
from test_jobs import create

from bench.cluster import start_redis
from textstream import keys
from textstream.api.relay.job_events import JobEvents
from textstream.api.relay.sse import Relay
from textstream.config import Settings
from textstream.engines.fake import WORDS
from textstream.transport.events import JobEvent
from textstream.transport.scripts import EventType
from textstream.worker.writer import EventWriter, StreamFlusher

PERSISTENT = ("--appendonly", "yes", "--appendfsync", "always")


def tokens_so_far(url: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=1)
    keys = client.keys("textstream:job:*:events")
    return sum(e.event == "token" for k in keys for e in stored_events(client, k))


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server this test may stop and restart on the same port."""
    port = free_port()
    state = {"proc": start_redis(tmp_path, port, *PERSISTENT)[0]}

    def restart(persistent: bool = True) -> None:
        state["proc"] = start_redis(tmp_path, port, *(PERSISTENT if persistent else ()))[0]

    yield f"redis://127.0.0.1:{port}/0", state, restart
    state["proc"].terminate()
    state["proc"].wait(10)


def test_open_stream_rides_out_a_short_redis_restart(own_redis, slow_model_dir, tmp_path):
    url, state, restart = own_redis
    env = service_env(url, str(slow_model_dir), REDIS_GRACE_SECONDS="15")
    svc = Service(tmp_path / "svc", env, workers=1)
    try:
        params = {"max_new_tokens": 300, "ignore_eos": True}
        reference = stream(svc.base, "/completion/Once upon a time", **params)
        result = {}
        reader = threading.Thread(
            target=lambda: result.update(
                r=stream(svc.base, "/completion/Once upon a time", **params)
            )
        )
        reader.start()
        wait_for(lambda: tokens_so_far(url) > len(reference.of("token")) + 20, 30, "tokens")
        state["proc"].terminate()
        state["proc"].wait(10)
        time.sleep(1.0)
        restart()
        reader.join(90)
        response = result["r"]
        assert response.last.event == "done", response.events[-2:]
        assert response.text == reference.text  # nothing lost, nothing doubled
        ids = [e.id for e in response.events if e.id]
        assert len(ids) == len(set(ids))
    finally:
        svc.stop()


def test_redis_down_ends_streams_and_everything_recovers_without_restarts(
    own_redis, slow_model_dir, tmp_path
):
    url, state, restart = own_redis
    env = service_env(url, str(slow_model_dir), REDIS_GRACE_SECONDS="1")
    svc = Service(tmp_path / "svc", env, workers=1)
    try:
        result = {}
        long = {"max_tokens": 1000, "ignore_eos": True, "model": "slow-gpt2"}
        # Non-streamed answers waiting when Redis goes: each must get the same
        # clear 503 as a stream's error event, not a 502 "the job failed".
        waiting = {
            "native": ("GET", "/completion/Hello", {"max_new_tokens": 1000, "stream": "false"}),
            "completions": ("POST", "/v1/completions", {"prompt": "Hello", **long}),
            "chat": (
                "POST",
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}], **long},
            ),
        }

        def answer(name: str, method: str, path: str, args: dict) -> None:
            where = (
                {"params": {**args, "ignore_eos": "true"}} if method == "GET" else {"json": args}
            )
            result[name] = httpx.request(method, svc.base + path, timeout=60, **where)

        readers = [
            threading.Thread(
                target=lambda: result.update(
                    r=stream(svc.base, "/completion/Hello", max_new_tokens=1000, ignore_eos=True)
                )
            ),
            *(threading.Thread(target=answer, args=(n, *a)) for n, a in waiting.items()),
        ]
        for reader in readers:
            reader.start()
        wait_for(lambda: tokens_so_far(url) > 40, 30, "tokens")
        state["proc"].kill()
        state["proc"].wait(10)

        for reader in readers:
            reader.join(30)
        open_stream = result["r"]
        assert open_stream.last.event == "error"
        assert open_stream.last.data["error"]["type"] == "redis_unavailable"
        for name in waiting:
            refused = result[name]
            assert refused.status_code == 503, (name, refused.status_code, refused.text)
            assert refused.headers["Retry-After"], name
            error = refused.json()["error"]
            assert "redis_unavailable" in (error.get("type"), error.get("code")), (name, error)

        started = time.monotonic()
        refused = httpx.get(svc.base + "/completion/quetzal 9931 Hi", timeout=10)
        assert refused.status_code == 503 and time.monotonic() - started < 2.5
        assert "quetzal" not in svc.api.output()  # its log line names the route, not the path
        assert httpx.get(svc.base + "/health", timeout=10).json()["redis"] is False

        restart(persistent=False)  # an empty Redis: everything must re-register

        def healthy() -> bool:
            body = httpx.get(svc.base + "/health", timeout=5).json()
            return bool(body["redis"]) and body["workers"] == 1

        wait_for(healthy, 30, "API and worker to reconnect")
        response = stream(svc.base, "/completion/Hi", max_new_tokens=3, ignore_eos=True, timeout=60)
        assert response.last.event == "done"
        assert svc.workers is not None and svc.workers.alive() and svc.api.alive()
    finally:
        svc.stop()


def test_gathered_writers_wait_out_one_outage_together_then_fail_together(own_redis):
    """Redis goes away for good under a worker process's gathered tokens: its jobs
    fail once the grace period has passed, all of them, not one grace period after
    another (which kept a worker's jobs running on for minutes)."""
    url, state, _ = own_redis
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    flusher = StreamFlusher(client, flush_ms=20)
    grace, writers = 2.0, []
    for n in range(4):
        job_id = f"outage{n}" + "0" * 25
        client.xadd(keys.job_events(job_id), {"event": "queued", "data": "{}"})
        writer = EventWriter(
            client, job_id, owner=f"w/{n}", ttl=60, maxlen=100, grace=grace, flusher=flusher
        )
        writer.history()
        writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
        writer.write(EventType.TOKEN, {"text": " -"}, [0])  # a first token goes at once
        writers.append(writer)
    state["proc"].kill()
    state["proc"].wait(10)
    lost = time.monotonic()
    for writer in writers:
        for i in range(1, 4):  # a run of three waits in each writer
            writer.write(EventType.TOKEN, {"text": f" x{i}"}, [i])
    wait_for(lambda: all(w.failure for w in writers), 4 * grace + 5, "the jobs to fail")
    took = time.monotonic() - lost
    assert grace <= took < 2 * grace + 1, took
    for writer in writers:
        with pytest.raises(redis.ConnectionError):
            writer.write(EventType.TOKEN, {"text": " y"}, [2])


def test_gathered_writers_find_their_jobs_gone_when_redis_comes_back_empty(own_redis):
    """Redis restarts without its data under a worker's gathered tokens: the jobs are
    gone, so the writers stop (their job is lost) and write nothing into the empty
    Redis: no stream without its `queued` event and its owner."""
    url, state, restart = own_redis
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    flusher = StreamFlusher(client, flush_ms=20)
    writers = []
    for n in range(3):
        job_id = f"empty{n}".ljust(32, "0")
        client.xadd(keys.job_events(job_id), {"event": "queued", "data": "{}"})
        writer = EventWriter(
            client, job_id, owner=f"w/{n}", ttl=60, maxlen=100, grace=10, flusher=flusher
        )
        writer.history()
        writer.write(EventType.STARTED, {"worker": "w"}, claim=True)
        writer.write(EventType.TOKEN, {"text": " -"}, [0])  # a first token goes at once
        writers.append(writer)
    state["proc"].kill()
    state["proc"].wait(10)
    for writer in writers:
        for i in range(1, 4):  # a run of three waits in each writer
            writer.write(EventType.TOKEN, {"text": f" x{i}"}, [i])
    restart(persistent=False)
    wait_for(lambda: all(w.lost_job for w in writers), 15, "the writers to find their jobs gone")
    assert all(w.failure is None for w in writers)
    assert client.keys("textstream:job:*") == []


def test_a_redis_freeze_past_the_grace_period_ends_jobs_whole_and_clearly(own_redis, tmp_path):
    """Redis stops answering (SIGSTOP) for longer than REDIS_GRACE_SECONDS under
    running jobs. A batch of gathered tokens that could not be sent used to be
    dropped while generation went on (a token missing mid-stream, then `done` with
    the full count), or the job was left reading as running with no worker. Now
    every job keeps its tokens whole, in order, and ends with a `redis_unavailable`
    error once Redis is back."""
    url, state, _ = own_redis
    env = service_env(url, "fake:30", REDIS_GRACE_SECONDS="1", REDIS_TIMEOUT="0.5")
    svc = Service(tmp_path / "svc", env, workers=1, concurrency=3)
    try:
        jobs = [
            create(svc.base, prompt=f"freeze {n}", max_new_tokens=1000, ignore_eos=True)
            for n in range(3)
        ]
        wait_for(lambda: tokens_so_far(url) > 30, 30, "tokens")
        pid = state["proc"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(4)
        finally:
            os.kill(pid, signal.SIGCONT)
        client = redis.Redis.from_url(url)

        def ended(job_id: str) -> bool:
            return httpx.get(f"{svc.base}/jobs/{job_id}", timeout=10).json()["status"] != "running"

        wait_for(lambda: all(ended(j) for j in jobs), 30, "every job to end")
        for job_id in jobs:
            stored = stored_events(client, keys.job_events(job_id))
            events = [e.event for e in stored]
            ids = [i for e in stored if e.event == "token" for i in e.token_ids]
            assert ids == [i % len(WORDS) for i in range(len(ids))]  # no gap, nothing twice
            assert events[-1] == "error" and events.count("error") == 1, events[-3:]
            last = stored[-1].data
            assert last["error"]["type"] == "redis_unavailable"
        # And the service serves again.
        response = stream(svc.base, "/completion/Hi", max_new_tokens=3, ignore_eos=True)
        assert response.last.event == "done"
    finally:
        svc.stop()


def test_a_short_redis_stall_is_ridden_out_by_the_shared_read_not_by_each_reader(own_redis):
    """Redis stops answering (SIGSTOP) for less than REDIS_GRACE_SECONDS under many
    relays waiting on one lane of the multiplexer. The lane's read times out; it
    used to fail every reader at once, and each retried on its own (thousands of
    re-registrations and re-sent reads at 10,000 streams, which kept the API and
    Redis saturated, and streams ended `redis_unavailable` with Redis up). Now the
    lane retries its one read: the readers see a delay, then every event once."""
    url, state, _ = own_redis
    readers, stall = 50, 2.5
    settings = Settings(_env_file=None, redis_grace_seconds=6, read_block_ms=60_000)  # type: ignore[call-arg]
    sync = redis.Redis.from_url(url, socket_timeout=5)

    async def scenario() -> tuple[dict[str, int], list[list[JobEvent]]]:
        client = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        jobs = JobEvents(client, ttl=60, maxlen=100, read_grace=settings.redis_grace_seconds)
        job_ids = [f"stall{n:03}".ljust(32, "0") for n in range(readers)]
        for job_id in job_ids:
            await jobs.append(job_id, EventType.QUEUED, {"job_id": job_id})
            await jobs.append(job_id, EventType.STARTED, {"worker": "w"})
        seen: list[list[JobEvent]] = [[] for _ in job_ids]

        async def read(n: int, job_id: str) -> None:
            async for event in Relay(jobs, settings, job_id).events():
                seen[n].append(event)

        tasks = [asyncio.create_task(read(n, j)) for n, j in enumerate(job_ids)]
        for job_id in job_ids:
            await jobs.append(job_id, EventType.TOKEN, {"text": " before"})
        await asyncio.sleep(0.5)  # every reader got it, and waits in the lane
        before = calls_by_command(sync)
        pid = state["proc"].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(stall)
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(1.5)  # what was sent during the stall has run
        after = calls_by_command(sync)
        for job_id in job_ids:
            await jobs.append(job_id, EventType.TOKEN, {"text": " after"})
            await jobs.append(job_id, EventType.DONE, {"finish_reason": "stop"})
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await jobs.close()
        await client.close()
        issued = {c: n - before.get(c, 0) for c, n in after.items() if n > before.get(c, 0)}
        return issued, seen

    issued, seen = asyncio.run(scenario())
    sync.close()
    for events in seen:
        assert [e.event for e in events] == ["queued", "started", "token", "token", "done"]
        assert [e.data.get("text") for e in events[2:4]] == [" before", " after"]
        assert len({e.id for e in events}) == len(events)
    # One lane: its re-sent reads, its CLIENT ID and presence checks, and the INFO
    # that measures it. Each reader retrying on its own sent six commands or more.
    assert issued.get("xread", 0) <= 6, issued
    assert sum(issued.values()) <= 15, issued


def calls_by_command(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}
