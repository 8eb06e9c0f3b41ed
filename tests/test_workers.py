"""Several worker processes on one host share the queue: each job runs exactly once."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Service
from helpers import service_env, stored_events, stream

from textstream import keys


@pytest.fixture(scope="module")
def two_workers(redis_url, tiny_model_dir, tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("two"), service_env(redis_url, str(tiny_model_dir)), 2)
    yield svc
    svc.stop()


def test_two_worker_processes_each_run_every_job_exactly_once(two_workers, redis_client):
    requests = 10

    def one(i: int):
        return stream(
            two_workers.base, f"/completion/request {i}", max_new_tokens=80, ignore_eos=True
        )

    with ThreadPoolExecutor(requests) as pool:
        responses = list(pool.map(one, range(requests)))

    servers = set()
    for response in responses:
        assert response.status == 200 and response.last.event == "done"
        assert response.last.data["usage"]["completion_tokens"] == 80
        # Read the job's whole stream back from Redis: one start, one end, no repeats.
        stored = stored_events(redis_client, keys.job_events(response.headers["x-job-id"]))
        names = [e.event for e in stored]
        assert names.count("started") == 1 and names.count("done") == 1
        assert names.count("token") == len(response.of("token"))
        servers.add(response.of("started")[0].data["worker"])
    assert len(servers) == 2, servers


def test_fake_engine_streams_fixed_text_at_its_rate(make_service):
    from textstream.engines.fake import WORDS

    svc = make_service(model="fake:200")
    response = stream(svc.base, "/completion/anything", max_new_tokens=40)
    assert response.last.event == "done" and response.last.data["model"] == "fake-200tps"
    assert response.text == "".join(" " + WORDS[i % len(WORDS)] for i in range(40))
    tokens = response.of("token")
    # The worker's own clock (it chooses the entry ids, "<ms>-<n>"), not the
    # client's: a busy client reads a paced stream in bursts.
    # ("<job id>:<ms>-<n>" on /completion).
    [last, first] = [int(t.id.rpartition(":")[2].split("-")[0]) for t in (tokens[-1], tokens[0])]
    seconds = (last - first) / 1000
    assert seconds > 0 and 39 / seconds < 200 * 1.5  # paced, not as fast as possible
