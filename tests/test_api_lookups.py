"""What an API process keeps between submissions, against a real Redis: the live
models (registry.LiveModels) and the HTTP request counts (metrics.RequestCounts)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from bench.cluster import start_redis
from textstream import keys
from textstream.api.metrics import RequestCounts
from textstream.registry import LiveModels, WorkerHeartbeat, WorkerInfo


def announce(url: str, model: str, worker_id: str) -> WorkerHeartbeat:
    info = WorkerInfo(worker_id, "host", 1, model, "cpu", 1)
    beat = WorkerHeartbeat(redis.Redis.from_url(url), info, 1.0)
    beat.beat()
    return beat


def test_live_models_are_read_once_a_second_and_an_empty_answer_is_not_kept(
    isolated_redis_url,
):
    async def scenario() -> None:
        client = aioredis.Redis.from_url(isolated_redis_url)
        live = LiveModels(max_age=0.5)
        try:
            assert await live.get(client) == []
            first = announce(isolated_redis_url, "m1", "w1")
            assert await live.get(client) == ["m1"]  # none was kept: seen at once
            second = announce(isolated_redis_url, "m2", "w2")
            # 50 submissions at once: the answer read a moment ago, no new read.
            answers = await asyncio.gather(*(live.get(client) for _ in range(50)))
            assert all(a == ["m1"] for a in answers)
            await asyncio.sleep(0.6)
            assert await live.get(client) == ["m1", "m2"]
            first.stop()
            second.stop()
            await asyncio.sleep(0.6)
            assert await live.get(client) == []
        finally:
            await client.close()

    asyncio.run(scenario())


def test_live_models_one_read_for_a_burst_of_submissions(isolated_redis_url):
    announce(isolated_redis_url, "m1", "w1")

    async def scenario() -> int:
        client = aioredis.Redis.from_url(isolated_redis_url)
        counting = redis.Redis.from_url(isolated_redis_url)
        counting.config_resetstat()
        live = LiveModels(max_age=10)
        try:
            answers = await asyncio.gather(*(live.get(client) for _ in range(200)))
            assert all(a == ["m1"] for a in answers)
            stats = counting.info("commandstats")
            return int(stats["cmdstat_zrange"]["calls"])
        finally:
            await client.close()

    assert asyncio.run(scenario()) == 1


def request_counts(url: str) -> dict[bytes, bytes]:
    return redis.Redis.from_url(url).hgetall(keys.METRICS_REQUESTS)


def test_request_counts_go_at_once_alone_and_together_in_a_burst(isolated_redis_url):
    async def scenario() -> None:
        client = aioredis.Redis.from_url(isolated_redis_url)
        counts = RequestCounts(every=0.3)
        try:
            await counts.add(client, "GET", "/r", 200)
            assert request_counts(isolated_redis_url) == {b"GET /r|200": b"1"}
            for _ in range(30):
                await counts.add(client, "GET", "/r", 200)
            await counts.add(client, "POST", "/r", 429)
            assert request_counts(isolated_redis_url) == {b"GET /r|200": b"1"}
            await asyncio.sleep(0.5)
            assert request_counts(isolated_redis_url) == {
                b"GET /r|200": b"31",
                b"POST /r|429": b"1",
            }
        finally:
            await client.close()

    asyncio.run(scenario())


def test_request_counts_outlive_a_redis_outage(tmp_path: Path):
    proc, url = start_redis(tmp_path)
    port = int(url.rsplit(":", 1)[1].split("/")[0])

    async def scenario() -> None:
        nonlocal proc
        client = aioredis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        counts = RequestCounts(every=0.1)
        try:
            proc.terminate()
            proc.wait(10)
            for _ in range(3):
                await counts.add(client, "GET", "/r", 503)  # never raises
                await asyncio.sleep(0.15)
            proc, _ = start_redis(tmp_path, port)  # back, and empty
            await counts.add(client, "GET", "/r", 200)  # the next request's write
            deadline = time.monotonic() + 10
            while request_counts(url) != {b"GET /r|200": b"1", b"GET /r|503": b"3"}:
                assert time.monotonic() < deadline, request_counts(url)
                await asyncio.sleep(0.2)
        finally:
            await client.close()

    try:
        asyncio.run(scenario())
    finally:
        proc.terminate()
        proc.wait(10)
