"""Faults the core pipeline must survive: Redis down, clients leaving, worker shutdown."""

from __future__ import annotations

import signal
import time

import httpx
from helpers import (
    free_port,
    service_env,
    start_api,
    start_workers,
    stored_events,
    wait_for,
    wait_for_workers,
)

from textstream import keys


def test_redis_down_gives_503_fast_and_health_says_so(tiny_model_dir, tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    api, base = start_api(service_env(dead, str(tiny_model_dir)), tmp_path)
    try:
        started = time.monotonic()
        response = httpx.get(base + "/completion/Hello", timeout=10)
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        # Which step found Redis away (the model lookup, or queueing) names the type.
        assert response.json()["error"]["type"] in ("redis_unavailable", "queue_unavailable")
        assert response.headers["retry-after"]
        assert elapsed < 2.5
        health = httpx.get(base + "/health", timeout=10).json()
        assert health["redis"] is False and health["workers"] == 0
    finally:
        api.stop()


def test_health_before_any_worker_reports_no_model(
    redis_url, tiny_model_dir, tmp_path, redis_client
):
    redis_client.delete("textstream:workers")
    api, base = start_api(service_env(redis_url, str(tiny_model_dir)), tmp_path)
    try:
        health = httpx.get(base + "/health", timeout=5).json()
        assert health == {
            "status": "ok",
            "redis": True,
            "workers": 0,
            "model": None,
            "models": [],
            "auth": False,
        }
        # The API only enqueues: it must not appear in ModelQ's registry of worker servers.
        assert not [k for k in redis_client.hkeys("servers") if k.startswith(b"api-")]
    finally:
        api.stop()


def test_client_disconnect_stops_generation(service, redis_client):
    job_id = None
    with httpx.stream(
        "GET",
        service.base + "/completion/Once upon a time",
        params={"max_new_tokens": 1000, "ignore_eos": "true"},
        timeout=30,
    ) as response:
        job_id = response.headers["x-job-id"]
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("event: token")
            if seen == 3:
                break
    key = keys.job_events(job_id)

    def last_event() -> str:
        entries = redis_client.xrevrange(key, count=1)
        return entries[0][1][b"event"].decode() if entries else ""

    wait_for(lambda: last_event() == "error", 10, "the worker to stop")
    events = stored_events(redis_client, key)
    names = [e.event for e in events]
    assert names[-1] == "error" and "cancelled" in events[-1].raw
    # Tokens written after the cancel request (the worker picks token ids from its
    # clock, Redis stamps the cancel with its own: one host's clock here): at most
    # the one in flight.
    cancel_ms = int(redis_client.hget(keys.job_state(job_id), "cancel"))
    late = [e for e in events if e.event == "token" and int(e.id.split("-")[0]) > cancel_ms]
    assert len(late) <= 2
    assert names.count("token") < 1000


def test_runner_stops_cleanly_on_sigterm(redis_url, tiny_model_dir, tmp_path):
    env = service_env(redis_url, str(tiny_model_dir))
    api, base = start_api(env, tmp_path)
    others = httpx.get(base + "/health", timeout=5).json()["workers"]
    workers = start_workers(env, tmp_path, workers=2, name="runner")
    try:
        wait_for_workers(base, others + 2, proc=workers)
        assert workers.popen is not None
        workers.popen.send_signal(signal.SIGTERM)
        assert workers.popen.wait(30) == 0
        assert "all workers stopped" in workers.output()
        # Workers deregister on the way out, so /health stops counting them at once.
        assert httpx.get(base + "/health", timeout=5).json()["workers"] == others
    finally:
        workers.stop()
        api.stop()
