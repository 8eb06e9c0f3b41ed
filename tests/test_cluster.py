"""Job streams on a real Redis Cluster (3 masters, 3 replicas), the queue on a plain
Redis: the scale-out run, a slot moved to another master mid-stream, the master of
a streaming job SIGKILLed (its replica takes over), and 503s, never 500s, when the
streams' Redis is away. One cluster and one service for the module; the failover
test runs last, since it leaves the cluster one node short."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Service
from helpers import SSEResponse, free_port, service_env, start_api, stored_events, stream, wait_for
from redis.cluster import RedisCluster
from test_isolation import every_route
from test_scale_out import sixty_requests_each_served_once

from bench.redis_cluster import LocalRedisCluster
from textstream import keys
from textstream.engines.fake import WORDS

RATE = 50  # tokens/s per stream (fake engine)


def expected_text(tokens: int) -> str:
    """What the fake engine says in `tokens` tokens (whatever the prompt)."""
    return "".join(" " + WORDS[i % len(WORDS)] for i in range(tokens))


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def on_cluster(redis_cluster, redis_url, tmp_path_factory):
    """3 worker processes (4 slots each) and 2 API processes; the queue on a database
    of the session's plain Redis, the streams on the cluster."""
    queue_url = f"{redis_url.rsplit('/', 1)[0]}/13"
    redis.Redis.from_url(queue_url).flushdb()
    env = service_env(
        queue_url,
        f"fake:{RATE}",
        STREAMS_REDIS_URL=redis_cluster.url,
        STREAMS_REDIS_CLUSTER="true",
        REDIS_GRACE_SECONDS="30",
    )
    workdir = tmp_path_factory.mktemp("on-cluster")
    first = Service(workdir / "a", env, workers=3, concurrency=4)
    second_api, second_base = start_api(env, workdir, name="api-b")
    streams = RedisCluster.from_url(redis_cluster.url)
    yield first, second_base, streams, queue_url
    first.stop()
    second_api.stop()
    streams.close()
    redis.Redis.from_url(queue_url).flushdb()


def follow(base: str, job_id: str, out: dict[str, Any], **params: Any) -> threading.Thread:
    """Read a job's events to the end in a thread, into out["r"]."""

    def read() -> None:
        out["r"] = stream(base, f"/jobs/{job_id}/events", timeout=120, **params)

    reader = threading.Thread(target=read)
    reader.start()
    return reader


def streaming_job(
    base: str, streams: RedisCluster, tokens: int
) -> tuple[dict[str, Any], dict[str, Any], threading.Thread]:
    """A job of `tokens` tokens, its reader following it in a thread (into the dict),
    once its stream holds some tokens."""
    body = {"prompt": "Hi", "max_new_tokens": tokens, "ignore_eos": True}
    job = httpx.post(base + "/jobs", json=body).json()
    result: dict[str, Any] = {}
    reader = follow(base, job["id"], result)
    wait_for(lambda: tokens_in_stream(streams, job["id"]) > 30, 30, "tokens")
    return job, result, reader


def tokens_in_stream(streams: RedisCluster, job_id: str) -> int:
    try:
        events = stored_events(streams, keys.job_events(job_id))
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return 0
    return sum(e.event == "token" for e in events)


def assert_whole_and_once(response: SSEResponse, tokens: int) -> None:
    """Every token once, in order, under distinct ascending ids, then `done`."""
    assert response.status == 200
    assert response.last.event == "done", response.events[-3:]
    assert response.text == expected_text(tokens)
    ids = [tuple(map(int, e.id.rpartition(":")[2].split("-"))) for e in response.events if e.id]
    assert ids == sorted(set(ids))


def test_scale_out_with_streams_on_a_cluster(on_cluster, redis_cluster):
    """The scale-out test (3 workers, 2 APIs, 60 concurrent requests, each served
    exactly once), with the job streams on the cluster and nothing of them on the
    queue's Redis; new streams spread over every master."""
    svc, second_base, streams, queue_url = on_cluster
    job_ids = sixty_requests_each_served_once(svc.base, second_base, streams)
    assert not redis.Redis.from_url(queue_url).keys("textstream:job:*")
    masters = {redis_cluster.master_of(keys.job_events(job_id)) for job_id in job_ids}
    assert masters == set(redis_cluster.masters_ports())


def test_a_slot_moved_to_another_master_mid_stream_loses_nothing(on_cluster, redis_cluster):
    svc, second_base, streams, _ = on_cluster
    tokens = 300
    job, result, reader = streaming_job(svc.base, streams, tokens)
    key = keys.job_events(job["id"])
    source = redis_cluster.master_of(key)
    target = next(p for p in redis_cluster.masters_ports() if p != source)
    redis_cluster.move_slot(redis_cluster.keyslot(key), target)
    assert redis_cluster.master_of(key) == target
    reader.join(120)
    assert_whole_and_once(result["r"], tokens)
    # A reader joining on the other API after the move reads the same stream.
    again = stream(second_base, job["events_url"])
    assert [e.id for e in again.events] == [e.id for e in result["r"].events]


def test_every_route_answers_503_not_500_while_the_streams_cluster_is_away(
    redis_url, tmp_path: Path
):
    """Only the streams' role is down (its cluster never answers; the queue's Redis
    is fine): every route that needs the streams answers 503 with Retry-After, and
    no route 500: cluster errors, not all of them RedisErrors, are 503s too."""
    env = service_env(
        redis_url,
        f"fake:{RATE}",
        STREAMS_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        STREAMS_REDIS_CLUSTER="true",
    )
    svc = Service(tmp_path / "svc", env, workers=0)
    try:
        schema = httpx.get(svc.base + "/openapi.json").json()
        tested = 0
        for path, method, response in every_route(svc.base, schema, "0" * 32, {}):
            assert response.status_code < 500 or response.status_code == 503, response
            if path == "/health" and method == "GET":  # HEAD: no body
                assert response.json()["redis"] is False
            if path.startswith(("/completion", "/jobs", "/v1/completions", "/v1/chat")):
                assert response.status_code == 503, (method, path, response.text)
                assert response.headers["retry-after"]
                tested += 1
        assert tested >= 7
    finally:
        svc.stop()


def test_sigkill_of_the_master_under_a_streaming_job(on_cluster, redis_cluster):
    """The master holding a streaming job is SIGKILLed; its replica is promoted, and
    the stream goes on: every token once, in order. Requests made meanwhile get
    answers or 503s, never 500s. (Runs last: the cluster stays one node short.)"""
    svc, second_base, streams, _ = on_cluster
    tokens = 500
    job, result, reader = streaming_job(svc.base, streams, tokens)
    master = redis_cluster.master_of(keys.job_events(job["id"]))
    redis_cluster.kill(master)
    killed_at = time.monotonic()
    statuses = set()
    while time.monotonic() - killed_at < 6:
        for response in (
            httpx.get(f"{second_base}/jobs/{job['id']}", timeout=15),
            httpx.post(second_base + "/jobs", json={"prompt": "Hi", "max_new_tokens": 2}),
            httpx.get(second_base + "/ready", timeout=15),
        ):
            statuses.add(response.status_code)
        time.sleep(0.3)
    assert statuses <= {200, 202, 503}, statuses
    reader.join(120)
    assert_whole_and_once(result["r"], tokens)
    redis_cluster.wait_healthy()
    # Ready again once every slot is served (CLUSTER INFO, not a node's PING), with
    # the workers the queue's Redis lists.
    wait_for(lambda: httpx.get(second_base + "/ready").status_code == 200, 15, "ready")
    assert httpx.get(second_base + "/health").json()["workers"] >= 1
    assert redis_cluster.master_of(keys.job_events(job["id"])) != master
    # The whole stream, read afresh from the promoted replica, is the same.
    again = stream(second_base, job["events_url"])
    assert [e.id for e in again.events] == [e.id for e in result["r"].events]
