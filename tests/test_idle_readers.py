"""Idle readers are cheap: what readers of waiting jobs need (queue position, live
workers, that the job still exists) is read once per queue per API process per
period, not once per reader."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from helpers import service_env, start_api
from redis.asyncio.connection import Connection
from test_jobs import create

from textstream import keys
from textstream.api.relay.job_events import JobEvents, JobVanishedError
from textstream.api.relay.mux import ReadMux, _pack_xread
from textstream.api.relay.sse import Relay
from textstream.config import Settings
from textstream.registry import WorkerHeartbeat, WorkerInfo
from textstream.sources import served_name
from textstream.transport.events import EventType

READERS = 50
PERIOD = 0.5  # QUEUE_STATUS_SECONDS


def commands_issued(client: redis.Redis) -> int:
    """Commands Redis has run since its start, all clients together."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(stat["calls"]) for stat in stats.values())


async def read_statuses(base: str, job_id: str, statuses: list[dict[str, Any]]) -> None:
    """Collect a job's `queued` status events (no id) until cancelled."""
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("GET", f"{base}/jobs/{job_id}/events") as response,
    ):
        event, has_id = "", False
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("id: "):
                has_id = True
            elif line.startswith("data: ") and event == "queued" and not has_id:
                statuses.append(json.loads(line[6:]))
            elif not line:
                event, has_id = "", False


@pytest.fixture
def api(isolated_redis_url: str, tmp_path: Path) -> Iterator[str]:
    """One API process, no worker."""
    env = service_env(
        isolated_redis_url,
        "fake",
        QUEUE_STATUS_SECONDS=str(PERIOD),
        JOB_TIMEOUT="120",
        WORKER_HEARTBEAT_SECONDS="60",  # one beat keeps a worker live throughout
    )
    proc, base = start_api(env, tmp_path)
    yield base
    proc.stop()


def test_readers_of_queued_jobs_do_not_multiply_redis_commands(api, isolated_redis_url):
    client = redis.Redis.from_url(isolated_redis_url)
    model = served_name("fake")
    # A worker of the model, announced but claiming nothing: its jobs wait, and the
    # queued events must count it.
    info = WorkerInfo("idle-w", platform.node(), os.getpid(), model, "cpu", 1)
    WorkerHeartbeat(client, info, 60).beat()
    job_ids = [create(api, prompt=f"Hi {n}", max_new_tokens=5) for n in range(READERS)]
    statuses: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in job_ids}

    async def scenario() -> tuple[int, float, dict[str, list[dict[str, Any]]]]:
        readers = [asyncio.create_task(read_statuses(api, j, statuses[j])) for j in job_ids]
        try:
            deadline = time.monotonic() + 30
            while not all(len(s) >= 2 for s in statuses.values()):
                assert time.monotonic() < deadline, "every reader to get its status events"
                await asyncio.sleep(0.1)
            before, started = commands_issued(client), time.monotonic()
            await asyncio.sleep(4 * PERIOD)
            issued, seconds = commands_issued(client) - before - 1, time.monotonic() - started
            # The first job leaves the queue: the others' next reports move up one.
            first = {job_id: list(seen) for job_id, seen in statuses.items()}
            async with httpx.AsyncClient(timeout=10) as http:
                await http.delete(f"{api}/jobs/{job_ids[0]}")
            for job_id in job_ids:
                statuses[job_id].clear()
            await asyncio.sleep(3 * PERIOD)
            return issued, seconds, first
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    issued, seconds, first = asyncio.run(scenario())
    per_period = issued / (seconds / PERIOD)
    # Per reader and period, a reader used to ask for its job's rank, the worker
    # registry (two round trips) and whether its job still exists: about six
    # commands each, 300 per period for 50 readers. Shared, it is a handful,
    # whatever the number of readers.
    assert per_period < READERS / 2, f"{issued} commands in {seconds:.1f} s"
    for n, job_id in enumerate(job_ids, start=1):
        assert {"job_id": job_id, "position": n, "workers": 1} in first[job_id], first[job_id]
    for n, job_id in enumerate(job_ids[1:], start=1):
        latest = statuses[job_id][-1]  # after job 0 left
        assert latest == {"job_id": job_id, "position": n, "workers": 1}, latest
    client.close()


async def open_jobs(client: aioredis.Redis, jobs: JobEvents, name: str, n: int) -> list[str]:
    """`n` jobs that a worker has started, with nothing written since."""
    job_ids = [f"{name}{i}".ljust(32, "0") for i in range(n)]
    for job_id in job_ids:
        await client.delete(keys.job_events(job_id), keys.job_state(job_id))
        await jobs.append(job_id, EventType.QUEUED, {"job_id": job_id})
        await jobs.append(job_id, EventType.STARTED, {"worker": "w"})
    return job_ids


def test_readers_of_running_jobs_make_no_round_trips_while_nothing_comes(redis_url):
    """Readers of started jobs with nothing to read wait in the process's one XREAD
    until their deadline (a local clock): Redis sees the multiplexer's read and its
    one check that the streams exist, whatever the number of readers."""
    settings = Settings(_env_file=None, queue_status_seconds=0.5, read_block_ms=500)  # type: ignore[call-arg]

    async def scenario() -> tuple[int, list[list[str]]]:
        client = aioredis.Redis.from_url(redis_url)
        sync = redis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        job_ids = await open_jobs(client, jobs, "idle", READERS)
        seen: list[list[str]] = [[] for _ in job_ids]

        async def read(n: int, job_id: str) -> None:
            relay = Relay(jobs, settings, job_id, deadline=time.time() + 60)
            async for event in relay.events():
                seen[n].append(event.event)

        readers = [asyncio.create_task(read(n, j)) for n, j in enumerate(job_ids)]
        await asyncio.sleep(1)  # every reader is waiting
        before = commands_issued(sync)
        await asyncio.sleep(4 * PERIOD)
        issued = commands_issued(sync) - before - 1
        await jobs.append(job_ids[7], EventType.DONE, {"finish_reason": "stop"})
        await asyncio.wait_for(readers[7], 5)  # a reader still gets what comes
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await jobs.close()
        await client.close()
        sync.close()
        return issued, seen

    issued, seen = asyncio.run(scenario())
    # Before: each reader asked whether its job still existed every wait (two
    # commands per reader and period).
    assert issued <= 8, issued
    assert seen[7] == ["queued", "started", "done"]


def test_a_stream_that_vanishes_ends_its_waiting_readers(redis_url):
    """Redis lost a job's stream (flushed, no reconnect): its readers learn it from
    the multiplexer's shared check, within about two of its periods."""

    async def scenario() -> tuple[list[str], float]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        gone, kept = await open_jobs(client, jobs, "vanish", 2)
        errors: list[str] = []

        async def read(job_id: str) -> None:
            try:
                async for _ in jobs.read_batches(job_id, block_ms=lambda: None):
                    pass
            except JobVanishedError as exc:
                errors.append(str(exc))

        readers = [asyncio.create_task(read(job_id)) for job_id in (gone, kept)]
        await asyncio.sleep(0.2)
        await client.delete(keys.job_events(gone), keys.job_state(gone))
        lost_at = time.monotonic()
        await asyncio.wait_for(readers[0], 3 * ReadMux.PRESENCE_SECONDS + 1)
        took = time.monotonic() - lost_at
        assert not readers[1].done()  # the other stream is still there
        readers[1].cancel()
        await asyncio.gather(readers[1], return_exceptions=True)
        await jobs.close()
        await client.close()
        return errors, took

    errors, took = asyncio.run(scenario())
    assert len(errors) == 1 and "vanish0" in errors[0]
    assert took <= 2 * ReadMux.PRESENCE_SECONDS + 0.5


def test_the_multiplexers_xread_is_packed_as_redis_py_packs_it():
    connection = Connection()
    for streams in ({"a": "1-0", "b:é": "2-3"}, {f"k{i}": f"{i}-{i}" for i in range(100)}):
        names, ids = zip(*streams.items(), strict=True)
        expected = connection.pack_command(
            "XREAD", "COUNT", 512, "BLOCK", 1000, "STREAMS", *names, *ids
        )
        assert _pack_xread(streams, 512, 1000) == b"".join(expected)
