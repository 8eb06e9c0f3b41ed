"""Streams that survive: queue limits, deadlines, cancelled queued jobs, worker
crashes and shutdowns, failing generations."""

from __future__ import annotations

import os
import signal
import time

import httpx
import redis
from helpers import queued, stored_events, stream, wait_for, wait_for_workers
from test_jobs import create, read_some
from tiny_models import TRAINED

from textstream import keys


def job_history(url: str, job_id: str) -> list[str]:
    client = redis.Redis.from_url(url)
    return [e.event for e in stored_events(client, keys.job_events(job_id))]


def test_queue_full_gets_429_and_enqueues_nothing(make_service, isolated_redis_url):
    svc = make_service(workers=0, MAX_QUEUED_JOBS="2", MAX_QUEUED_PER_CALLER="2")
    for _ in range(2):
        create(svc.base, prompt="Hi")
    response = httpx.post(svc.base + "/jobs", json={"prompt": "Hi"}, timeout=5)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["type"] == "queue_full"
    assert httpx.get(svc.base + "/completion/Hi", timeout=5).status_code == 429
    assert queued(redis.Redis.from_url(isolated_redis_url)) == 2


def test_waiting_job_reports_its_position_and_no_workers(make_service):
    svc = make_service(workers=0, QUEUE_STATUS_SECONDS="0.3", JOB_TIMEOUT="2")
    create(svc.base, prompt="first")
    second = create(svc.base, prompt="second")
    events = stream(svc.base, f"/jobs/{second}/events").events
    statuses = [e.data for e in events if e.event == "queued" and e.id is None]
    assert statuses and statuses[0] == {"job_id": second, "position": 2, "workers": 0}
    # Nobody ever took it: the deadline ends it.
    assert events[-1].event == "error" and events[-1].data["error"]["type"] == "timeout"


def test_queued_job_waits_for_a_worker_to_start(make_service, tiny_model_dir):
    svc = make_service(workers=0)
    job_id = create(svc.base, prompt="The capital of France is", max_new_tokens=5)
    time.sleep(1)
    assert httpx.get(f"{svc.base}/jobs/{job_id}", timeout=5).json()["status"] == "queued"
    later = make_service(workers=1)  # same Redis database: a worker arrives
    response = stream(later.base, f"/jobs/{job_id}/events")
    assert response.last.event == "done" and response.text.startswith(" Paris.")
    assert TRAINED["The capital of France is"].startswith(response.text)


def test_cancelled_queued_job_is_never_generated(make_service, isolated_redis_url):
    svc = make_service(workers=0)
    job_id = create(svc.base, prompt="Hello", max_new_tokens=5)
    response = httpx.delete(f"{svc.base}/jobs/{job_id}", timeout=5)
    assert response.json()["status"] == "cancelled"
    assert stream(svc.base, f"/jobs/{job_id}/events").last.data["error"]["type"] == "cancelled"
    worker = make_service(workers=1)
    client = redis.Redis.from_url(isolated_redis_url)
    wait_for(lambda: queued(client) == 0, 30, "the worker to claim the job")
    wait_for(lambda: not queued(client, "processing_tasks"), 10, "the claim to finish")
    assert "started" not in job_history(isolated_redis_url, job_id)
    assert worker.workers is not None and job_id not in worker.workers.output().split("done")[0]


def test_running_job_past_its_deadline_times_out_and_stops(make_service, isolated_redis_url):
    svc = make_service(model="fake:20", JOB_TIMEOUT="1.5")  # 1000 words at 20 a second
    response = stream(svc.base, "/completion/Hello", max_new_tokens=1000, ignore_eos=True)
    assert response.last.event == "error" and response.last.data["error"]["type"] == "timeout"
    tokens = len(response.of("token"))
    assert 0 < tokens < 1000
    time.sleep(0.5)  # nothing more is generated after the timeout
    assert job_history(isolated_redis_url, response.headers["x-job-id"]).count("token") == tokens


def test_killed_worker_is_taken_over_with_identical_greedy_text(make_service, slow_model_dir):
    params = {"max_new_tokens": 200, "ignore_eos": True}
    svc = make_service(workers=2, model=slow_model_dir, TAKEOVER_AFTER_SECONDS="2")
    reference = stream(svc.base, "/completion/Once upon a time", **params)
    assert reference.last.event == "done"

    job_id = create(svc.base, prompt="Once upon a time", **params)
    first = read_some(svc.base, job_id, tokens=20)
    victim = next(e.data["worker"] for e in first if e.event == "started")
    workers = redis.Redis.from_url(svc.env["REDIS_URL"]).get(f"textstream:worker:{victim}")
    killed_at = time.monotonic()
    os.kill(int(__import__("json").loads(workers)["pid"]), signal.SIGKILL)

    rest = stream(svc.base, f"/jobs/{job_id}/events", last_event_id=first[-1].id, timeout=120)
    resumed = rest.of("resumed")
    assert len(resumed) == 1 and resumed[0].data["worker"] != victim
    recovery = resumed[0].received_at - (time.time() - (time.monotonic() - killed_at))
    assert recovery < 15
    text = "".join(e.data["text"] for e in first + rest.events if e.event == "token")
    assert text == reference.text  # no token lost or doubled
    assert rest.last.data["usage"]["completion_tokens"] == 200
    status = httpx.get(f"{svc.base}/jobs/{job_id}", timeout=5).json()
    assert status["takeovers"] == 1 and status["text"] == reference.text


def test_sigterm_lets_the_running_job_finish(make_service):
    # The worker's stop is under test, not the model: 150 words at 50 a second.
    svc = make_service(workers=1, model="fake:50", WORKER_SHUTDOWN_GRACE="30")
    job_id = create(svc.base, prompt="Hello", max_new_tokens=150, ignore_eos=True)
    read_some(svc.base, job_id, tokens=5)
    assert httpx.get(f"{svc.base}/jobs/{job_id}", timeout=5).json()["status"] == "running"
    assert svc.workers is not None and svc.workers.popen is not None
    svc.workers.popen.send_signal(signal.SIGTERM)
    response = stream(svc.base, f"/jobs/{job_id}/events")
    assert response.last.event == "done" and not response.of("resumed")
    assert svc.workers.popen.wait(30) == 0


def test_sigterm_past_the_grace_leaves_the_job_to_another_worker(make_service, slow_model_dir):
    first = make_service(workers=1, model=slow_model_dir, WORKER_SHUTDOWN_GRACE="0.5")
    # Long enough to be running still once the second service is up.
    job_id = create(first.base, prompt="Hello", max_new_tokens=400, ignore_eos=True)
    read_some(first.base, job_id, tokens=5)
    second = make_service(workers=1, model=slow_model_dir)
    assert first.workers is not None and first.workers.popen is not None
    first.workers.popen.send_signal(signal.SIGTERM)
    assert first.workers.popen.wait(30) == 0
    response = stream(second.base, f"/jobs/{job_id}/events", timeout=120)
    assert response.last.event == "done" and len(response.of("resumed")) == 1
    assert response.last.data["usage"]["completion_tokens"] == 400


def test_generation_error_ends_the_job_and_the_worker_keeps_serving(make_service, tmp_path):
    broken = tmp_path / "nan-gpt2"
    from tiny_models import build_nan_gpt2

    build_nan_gpt2(broken)
    svc = make_service(workers=1, model=broken)
    failed = stream(svc.base, "/completion/Hello", temperature=1.0, max_new_tokens=5)
    assert failed.last.event == "error"
    assert failed.last.data["error"]["type"] == "generation_failed"
    assert "probability" in failed.last.data["error"]["message"]
    ok = stream(svc.base, "/completion/Hello", max_new_tokens=3, ignore_eos=True)
    assert ok.last.event == "done"
    wait_for_workers(svc.base, 1)


def test_trained_text_survives_a_round_trip_through_jobs(service):
    job_id = create(service.base, prompt="Say hi in emoji:", max_new_tokens=60)
    assert stream(service.base, f"/jobs/{job_id}/events").text == TRAINED["Say hi in emoji:"]
