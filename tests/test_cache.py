"""The response cache: deterministic requests replayed from Redis, single-flight,
never a sampled-without-seed, cancelled or failed generation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis
import redis.asyncio as aioredis
from conftest import Service
from helpers import parse_sse_lines, service_env, stream, wait_for

from bench.cluster import start_redis
from textstream import keys
from textstream.api.cache import cached_job, claim
from textstream.api.relay.job_events import JobEvents

CACHED = {"CACHE_TTL": "60"}


def cached_service(tmp_path_factory: pytest.TempPathFactory, model: Path) -> Iterator[Service]:
    """A service with the cache on, on a Redis of its own, shared by the tests that
    leave its workers running (each asks what no other test of the module asks, so
    no answer is cached for another test)."""
    proc, url = start_redis(tmp_path_factory.mktemp("cache-redis"))
    svc = Service(tmp_path_factory.mktemp("cached"), service_env(url, str(model), **CACHED), 1)
    try:
        yield svc
    finally:
        svc.stop()
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    yield from cached_service(tmp_path_factory, tiny_model_dir)


@pytest.fixture(scope="module")
def cached_slow(
    tmp_path_factory: pytest.TempPathFactory, slow_model_dir: Path
) -> Iterator[Service]:
    """The same on the slow GPT-2 (a job still runs while the next request comes)."""
    yield from cached_service(tmp_path_factory, slow_model_dir)


def started_events(url: str, job_id: str) -> int:
    client = redis.Redis.from_url(url)
    return sum(f[b"event"] == b"started" for _, f in client.xrange(keys.job_events(job_id)))


def test_identical_request_is_replayed_with_no_worker_running(make_service):
    svc = make_service(**CACHED)
    first = stream(svc.base, "/completion/The capital of France is", max_new_tokens=12)
    assert first.headers["x-cache"] == "miss" and first.last.event == "done"
    assert svc.workers is not None
    svc.workers.stop()
    wait_for(lambda: httpx.get(svc.base + "/health").json()["workers"] == 0, 10, "no workers")

    again = stream(svc.base, "/completion/The capital of France is", max_new_tokens=12)
    assert again.headers["x-cache"] == "hit"
    assert again.headers["x-job-id"] == first.headers["x-job-id"]
    assert [(e.event, e.data) for e in again.events] == [(e.event, e.data) for e in first.events]
    whole = httpx.get(
        svc.base + "/completion/The capital of France is",
        params={"max_new_tokens": 12, "stream": "false"},
    )
    assert whole.headers["x-cache"] == "hit" and whole.json()["text"] == first.text
    # A different request still needs a worker: it queues instead.
    other = httpx.post(svc.base + "/jobs", json={"prompt": "something else"}).json()
    status = httpx.get(f"{svc.base}/jobs/{other['id']}").json()["status"]
    assert status == "queued"


def test_simultaneous_identical_requests_cause_one_generation(cached_slow):
    svc = cached_slow
    stream(svc.base, "/completion/warm up", max_new_tokens=1)  # the served model is known
    results: list = [None] * 4

    def ask(i: int) -> None:
        results[i] = stream(svc.base, "/completion/Hello", max_new_tokens=150, ignore_eos=True)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    job_ids = {r.headers["x-job-id"] for r in results}
    assert len(job_ids) == 1
    assert sorted(r.headers["x-cache"] for r in results) == ["hit", "hit", "hit", "miss"]
    assert len({r.text for r in results}) == 1 and all(r.last.event == "done" for r in results)
    assert started_events(svc.env["REDIS_URL"], job_ids.pop()) == 1


def test_sampling_without_a_seed_is_never_cached(cached):
    svc = cached
    stream(svc.base, "/completion/warm up", max_new_tokens=1)
    sampled = [
        stream(svc.base, "/completion/Hello", temperature=1.0, max_new_tokens=5) for _ in range(2)
    ]
    assert [r.headers["x-cache"] for r in sampled] == ["miss", "miss"]
    assert sampled[0].headers["x-job-id"] != sampled[1].headers["x-job-id"]
    seeded = [
        stream(svc.base, "/completion/Hello", temperature=1.0, seed=5, max_new_tokens=5)
        for _ in range(2)
    ]
    assert [r.headers["x-cache"] for r in seeded] == ["miss", "hit"]


def test_use_cache_false_and_cache_ttl_zero_turn_it_off(make_service):
    # API policy: a fake-engine worker (no torch to import) serves it.
    svc = make_service(model="fake:200", **CACHED)
    stream(svc.base, "/completion/Hello", max_new_tokens=3)
    off = stream(svc.base, "/completion/Hello", max_new_tokens=3, use_cache="false")
    assert off.headers["x-cache"] == "miss"
    body = {"prompt": "Hello", "max_new_tokens": 3, "use_cache": False}
    assert httpx.post(svc.base + "/jobs", json=body).status_code == 202
    disabled = make_service(model="fake:200", CACHE_TTL="0")
    runs = [stream(disabled.base, "/completion/Hello", max_new_tokens=3) for _ in range(2)]
    assert [r.headers["x-cache"] for r in runs] == ["miss", "miss"]


def test_cancelled_generation_is_not_cached(cached_slow):
    svc = cached_slow
    stream(svc.base, "/completion/warm up", max_new_tokens=1)
    params = {"max_new_tokens": 300, "ignore_eos": "true"}
    with httpx.stream("GET", svc.base + "/completion/Hello", params=params, timeout=30) as r:
        first_job = r.headers["x-job-id"]
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # leave after the first token: the job is cancelled
    status = lambda: httpx.get(f"{svc.base}/jobs/{first_job}").json()["status"]  # noqa: E731
    wait_for(lambda: status() == "cancelled", 10, "the cancel")
    again = stream(svc.base, "/completion/Hello", **params)
    assert again.headers["x-cache"] == "miss" and again.headers["x-job-id"] != first_job
    assert again.last.event == "done"


def test_a_shared_job_keeps_running_when_one_reader_leaves(cached_slow):
    svc = cached_slow
    stream(svc.base, "/completion/warm up", max_new_tokens=1)
    params = {"max_new_tokens": 200, "ignore_eos": "true"}
    result = {}
    stayer = threading.Thread(
        target=lambda: result.update(r=stream(svc.base, "/completion/Hello", **params))
    )
    stayer.start()
    time.sleep(0.5)  # the staying reader's job is queued first
    with httpx.stream("GET", svc.base + "/completion/Hello", params=params, timeout=30) as r:
        leaver_job = r.headers["x-job-id"]
        assert r.headers["x-cache"] == "hit"
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # this reader leaves; the other still wants the answer
    stayer.join(60)
    assert result["r"].headers["x-job-id"] == leaver_job
    assert result["r"].last.event == "done" and not result["r"].of("error")


def test_openai_requests_share_the_cache(cached):
    svc = cached
    client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="x", max_retries=0)
    args = {
        "model": "tiny-gpt2",
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
    }
    first = client.completions.with_raw_response.create(**args)
    again = client.completions.with_raw_response.create(**args)
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert first.parse().choices[0].text == again.parse().choices[0].text
    # n seeded choices are n samples (seed + i), each cached apart: never n copies
    # of one answer; the same request again gets the same n from the cache.
    sampled = {**args, "prompt": "a b c", "temperature": 1.0, "seed": 11, "n": 3}
    first = client.completions.with_raw_response.create(**sampled)
    again = client.completions.with_raw_response.create(**sampled)
    assert first.headers["x-cache"] == "miss, miss, miss"
    assert again.headers["x-cache"] == "hit, hit, hit"
    jobs = first.headers["x-job-id"].split(", ")
    assert len(set(jobs)) == 3 and again.headers["x-job-id"] == first.headers["x-job-id"]
    texts = [c.text for c in first.parse().choices]
    assert len(set(texts)) > 1 and texts == [c.text for c in again.parse().choices]


def test_a_claim_whose_job_is_still_being_created_is_followed_not_dropped(redis_url):
    """The cache entry is claimed before its job's stream is written: a request that
    reads the entry in between waits for the stream instead of dropping the entry
    (and starting a second generation of the same answer). An old entry whose job
    is gone is still dropped at once."""
    job_id, stale = "creating".ljust(32, "0"), "stale".ljust(32, "0")
    key = "textstream:test:cache:creating"

    async def scenario() -> tuple[str | None, str | None, float, bytes | None]:
        client = aioredis.Redis.from_url(redis_url)
        jobs = JobEvents(client, ttl=60, maxlen=100)
        await client.delete(key, keys.job_events(job_id))
        assert await claim(client, key, job_id, 600)

        async def create_later() -> None:
            await asyncio.sleep(0.3)
            await client.xadd(keys.job_events(job_id), {"event": "queued", "data": "{}"})

        creator = asyncio.create_task(create_later())
        found = await cached_job(client, jobs, key, ttl=600, creating=5)
        await creator
        await client.set(key, stale, ex=10)  # set 590 s ago, as far as ttl=600 tells
        started = time.monotonic()
        gone = await cached_job(client, jobs, key, ttl=600, creating=5)
        took = time.monotonic() - started
        left = await client.get(key)
        await client.close()
        return found, gone, took, left

    found, gone, took, left = asyncio.run(scenario())
    assert found == job_id
    assert gone is None and took < 1 and left is None


def test_an_eventsource_reconnecting_to_completion_resumes_or_stops(cached):
    """A browser EventSource reconnects to the same /completion URL with
    Last-Event-ID, also after `done`. Answered by the same (cached) job, it gets
    what follows that event, or 204 at the end, never the whole answer again."""
    service = cached
    url = "/completion/Resume me"
    params = {"max_new_tokens": 12, "ignore_eos": "true"}
    whole = stream(service.base, url, **params)
    assert whole.last.event == "done"
    middle = [e for e in whole.events if e.event == "token"][4]
    rest = read_some_url(service.base, url, params, {"Last-Event-ID": middle.id})
    ids = [e.id for e in whole.events]
    assert [e.id for e in rest if e.id] == ids[ids.index(middle.id) + 1 :]
    at_end = httpx.get(
        service.base + url, params=params, headers={"Last-Event-ID": whole.last.id}, timeout=10
    )
    assert at_end.status_code == 204 and at_end.headers["x-job-id"] == whole.headers["x-job-id"]
    bad = httpx.get(service.base + url, params=params, headers={"Last-Event-ID": "x"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "Last-Event-ID"


def read_some_url(base: str, url: str, params: dict, headers: dict) -> list:
    with httpx.stream("GET", base + url, params=params, headers=headers, timeout=30) as r:
        assert r.status_code == 200 and r.headers["x-job-id"]
        return parse_sse_lines(list(r.iter_lines()))
