"""Scaling out on one Redis: several worker processes and several API processes."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
from conftest import Service
from helpers import service_env, start_api, stored_events, stream
from test_jobs import read_some

from textstream import keys


@pytest.fixture(scope="module")
def cluster(redis_url, tiny_model_dir, tmp_path_factory):
    url = f"{redis_url.rsplit('/', 1)[0]}/14"
    redis.Redis.from_url(url).flushdb()
    env = service_env(url, str(tiny_model_dir))
    workdir = tmp_path_factory.mktemp("cluster")
    first = Service(workdir / "a", env, workers=3)
    second_api, second_base = start_api(env, workdir, name="api-b")
    yield url, first.base, second_base
    first.stop()
    second_api.stop()
    redis.Redis.from_url(url).flushdb()


def test_sixty_concurrent_requests_over_three_workers_and_two_apis(cluster):
    url, base_a, base_b = cluster
    sixty_requests_each_served_once(base_a, base_b, redis.Redis.from_url(url))


def sixty_requests_each_served_once(base_a: str, base_b: str, streams: Any) -> list[str]:
    """60 concurrent requests spread over two APIs all complete, each generated
    exactly once, and every one of 3 workers serves some; their job ids. `streams`
    reads the job streams (a Redis, or a cluster client)."""

    def ask(i: int):
        base = base_a if i % 2 else base_b
        return stream(
            base, f"/completion/request {i}", max_new_tokens=30, ignore_eos=True, timeout=120
        )

    with ThreadPoolExecutor(60) as pool:
        responses = list(pool.map(ask, range(60)))

    served = Counter()
    for response in responses:
        assert response.status == 200 and response.last.event == "done", response.events[-2:]
        assert response.last.data["usage"]["completion_tokens"] == 30
        key = keys.job_events(response.headers["x-job-id"])
        names = [e.event for e in stored_events(streams, key)]
        assert names.count("started") == 1 and names.count("done") == 1  # exactly once
        assert not names.count("resumed")
        served[response.of("started")[0].data["worker"]] += 1
    job_ids = [r.headers["x-job-id"] for r in responses]
    assert len(set(job_ids)) == 60
    assert len(served) == 3, served  # every worker served some
    return job_ids


def test_stream_started_on_one_api_resumes_on_the_other(cluster):
    _, base_a, base_b = cluster
    job = httpx.post(
        base_a + "/jobs", json={"prompt": "Hello", "max_new_tokens": 400, "ignore_eos": True}
    ).json()
    first = read_some(base_a, job["id"], tokens=5)
    rest = stream(base_b, job["events_url"], last_event_id=first[-1].id)
    whole = stream(base_a, job["events_url"])
    assert [e.id for e in first + rest.events] == [e.id for e in whole.events]
    assert rest.last.event == "done"
