"""The operator's view and the service's locks: /ready, /workers, /metrics, API keys,
rate limits, CORS, structured logs, Redis credentials."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
from conftest import Service
from helpers import free_port, service_env, stream, wait_for
from prometheus_client.parser import text_string_to_metric_families

from bench.cluster import start_redis
from textstream.logs import brief


def metric_values(
    base: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple], float]:
    text = httpx.get(base + "/metrics", headers=headers, timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_ready_flips_with_worker_start_and_stop(make_service):
    api = make_service(workers=0)
    not_ready = httpx.get(api.base + "/ready")
    assert not_ready.status_code == 503 and "no live worker" in not_ready.json()["reason"]
    with_worker = make_service(workers=1)  # same Redis: a worker appears
    wait_for(lambda: httpx.get(api.base + "/ready").status_code == 200, 30, "ready")
    assert httpx.get(api.base + "/ready").json()["models"] == ["tiny-gpt2"]
    workers = httpx.get(api.base + "/workers").json()["workers"]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["model"] == "tiny-gpt2" and worker["device"] == "cpu"
    assert worker["slots"] == 1 and worker["free"] + worker["busy"] == 1
    assert worker["last_heartbeat_seconds_ago"] < 3 and worker["model_load_seconds"] > 0
    assert with_worker.workers is not None
    with_worker.workers.stop()
    wait_for(lambda: httpx.get(api.base + "/ready").status_code == 503, 10, "not ready")


def test_metrics_parse_move_after_a_request_and_agree_across_api_processes(make_service, tmp_path):
    svc = make_service()
    before = metric_values(svc.base)
    response = stream(svc.base, "/completion/Hello", max_new_tokens=12, ignore_eos=True)
    assert response.last.event == "done"
    route = (
        "textstream_http_requests_total",
        (("method", "GET"), ("route", "/completion/{question:text}"), ("status", "200")),
    )
    # Request counts are written when the response has ended, and batched over a
    # quarter of a second: on a loaded machine the count lands a little after the
    # client has read the last event.
    tokens = ("textstream_generation_tokens_total", (("model", "tiny-gpt2"),))

    def counted() -> bool:
        now = metric_values(svc.base)
        return now.get(route, 0) > before.get(route, 0) and now.get(tokens, 0) > before.get(
            tokens, 0
        )

    wait_for(counted, 10, "the request's counts")
    after = metric_values(svc.base)
    model = (("model", "tiny-gpt2"),)  # job figures carry the model they were for
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_generation_tokens",
    ):
        key = (f"textstream_{name}_count", model)
        assert after[key] == before.get(key, 0) + 1, name
    itl = ("textstream_inter_token_latency_seconds_count", model)
    assert after[itl] >= before.get(itl, 0) + 5
    assert after[tokens] - before.get(tokens, 0) == 12
    assert after[route] == before.get(route, 0) + 1
    assert after[("textstream_workers", model)] == 1

    def rate() -> float:
        values = metric_values(svc.base)
        found = [
            v
            for (n, _), v in values.items()
            if n == "textstream_worker_generation_tokens_per_second"
        ]
        return found[0] if found else 0.0

    wait_for(lambda: rate() > 0, 5, "the worker's decode rate")

    # A second API process reports the same figures: they live in Redis.
    second = Service(tmp_path / "second", svc.env, workers=0)
    try:
        theirs = metric_values(second.base)
        for key, value in after.items():
            if key[0].startswith(("textstream_time_to_first", "textstream_generation_tokens")):
                assert theirs[key] == value
    finally:
        second.stop()


KEYS = {"API_KEYS": "key-one,key-two"}


def test_api_keys_guard_everything_but_health_and_the_page(make_service):
    svc = make_service(model="fake:200", **KEYS)  # the keys are under test, not the model
    assert httpx.get(svc.base + "/health").status_code == 200
    assert httpx.get(svc.base + "/").status_code == 200
    for method, path in [
        ("GET", "/completion/hi"),
        ("POST", "/jobs"),
        ("GET", "/metrics"),
        ("GET", "/ready"),
        ("GET", "/workers"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/fake-200tps"),
        ("GET", "/jobs/" + "a" * 32),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
            response = httpx.request(method, svc.base + path, headers=headers, json={"prompt": "x"})
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["message"]
    ok = stream(svc.base, "/completion/Hello", max_new_tokens=2)
    assert ok.status == 401
    # A body that is not even JSON: who is calling is settled before it is parsed.
    for path in ("/jobs", "/v1/completions", "/v1/chat/completions"):
        for content in (b"{bad", b"\xff\xfe"):
            response = httpx.post(
                svc.base + path, content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == 401, (path, content, response.text)
    assert httpx.head(svc.base + "/health").status_code == 200
    assert httpx.head(svc.base + "/ready").status_code == 401
    for key in ("key-one", "key-two"):  # models are the deployment's, seen alike by every key
        card = httpx.get(
            svc.base + "/v1/models/fake-200tps", headers={"Authorization": f"Bearer {key}"}
        )
        assert card.status_code == 200 and card.json()["id"] == "fake-200tps"
    good = {"Authorization": "Bearer key-two"}
    assert httpx.get(svc.base + "/ready", headers=good).status_code == 200
    client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="key-one", max_retries=0)
    assert (
        client.completions.create(
            model="fake-200tps", prompt="Hi", max_tokens=2
        ).usage.completion_tokens
        == 2
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{svc.base}/v1", api_key="nope", max_retries=0).models.list()


def test_event_stream_token_is_scoped_to_its_job_and_expires(make_service):
    svc = make_service(model="fake:200", STREAM_TOKEN_SECONDS="2", **KEYS)
    auth = {"Authorization": "Bearer key-one"}
    first = httpx.post(
        svc.base + "/jobs", json={"prompt": "Hi", "max_new_tokens": 3}, headers=auth
    ).json()
    other = httpx.post(
        svc.base + "/jobs", json={"prompt": "Yo", "max_new_tokens": 3}, headers=auth
    ).json()
    token = first["events_token"]
    assert token and "key-one" not in token
    response = stream(svc.base, first["events_url"], access_token=token)
    assert response.status == 200 and response.last.event == "done"
    # A wrong key beside the token is refused: a credential presented must be right.
    wrong = {"Authorization": "Bearer not-a-key"}
    refused = httpx.get(
        svc.base + first["events_url"], params={"access_token": token}, headers=wrong, timeout=10
    )
    assert refused.status_code == 401
    assert stream(svc.base, other["events_url"], access_token=token).status == 401
    assert (
        httpx.get(svc.base + f"/jobs/{first['id']}", params={"access_token": token}).status_code
        == 401
    )
    time.sleep(2.5)
    assert stream(svc.base, first["events_url"], access_token=token).status == 401


def test_rate_limit_gives_429_with_retry_after(make_service):
    svc = make_service(workers=0, RATE_LIMIT="3", **KEYS)
    auth = {"Authorization": "Bearer key-one"}
    # 7 quick calls: whichever minute boundary falls between them, one window sees 4.
    codes = [httpx.get(svc.base + "/workers", headers=auth).status_code for _ in range(7)]
    assert 429 in codes and codes[:3] == [200, 200, 200]
    limited = httpx.get(svc.base + "/workers", headers=auth)
    if limited.status_code == 429:
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"]["type"] == "rate_limited"
    # Limits are per key: the other key still gets through.
    assert (
        httpx.get(svc.base + "/workers", headers={"Authorization": "Bearer key-two"}).status_code
        == 200
    )


def test_concurrent_streams_are_capped_per_key(make_service):
    svc = make_service(model="fake:20", MAX_STREAMS_PER_KEY="1", **KEYS)  # 300 tokens: 15 s
    auth = {"Authorization": "Bearer key-one"}
    params = {"max_new_tokens": 300, "ignore_eos": "true", "use_cache": "false"}
    with httpx.stream(
        "GET", svc.base + "/completion/Hello", params=params, headers=auth, timeout=30
    ) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # keep the iterator: dropping it closes the response
        next(lines)
        second = httpx.get(svc.base + "/completion/Hello", params=params, headers=auth)
        assert second.status_code == 429 and "open streams" in second.json()["error"]["message"]

    def freed() -> bool:
        with httpx.stream(
            "GET", svc.base + "/completion/Hi", params={"max_new_tokens": 1}, headers=auth
        ) as r:
            return r.status_code == 200

    wait_for(freed, 10, "the first stream's slot to be released")


def test_cors_is_closed_by_default_and_opens_for_configured_origins(make_service):
    closed = make_service(workers=0)
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert (
        "access-control-allow-origin"
        not in httpx.options(closed.base + "/jobs", headers=preflight).headers
    )
    opened = make_service(workers=0, CORS_ORIGINS="https://app.example")
    allowed = httpx.options(opened.base + "/jobs", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.options(
        opened.base + "/jobs", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_request_logs_are_structured_and_carry_no_prompt(make_service):
    svc = make_service(workers=1)
    prompt = "quetzal confidential 9931 The capital of France is"
    response = stream(svc.base, f"/completion/{prompt}", max_new_tokens=4)
    time.sleep(0.5)
    lines = [json.loads(line) for line in svc.api.output().splitlines() if line.startswith("{")]
    requests = [
        line
        for line in lines
        if line["msg"] == "request" and line.get("job_id") == response.headers["x-job-id"]
    ]
    assert len(requests) == 1
    entry = requests[0]
    assert entry["status"] == 200 and entry["duration_ms"] > 0 and len(entry["request_id"]) == 32
    assert entry["route"] == "/completion/{question:text}" and entry["path"].startswith(
        "/completion/<"
    )
    for output in (svc.api.output(), svc.workers.output() if svc.workers else ""):
        assert "quetzal" not in output and "9931" not in output


def test_redis_credentials_in_the_url_work_for_api_and_workers(tiny_model_dir, tmp_path: Path):
    port = free_port()
    proc, _ = start_redis(tmp_path, port, "--requirepass", "pa55word", password="pa55word")
    url = f"redis://:pa55word@127.0.0.1:{port}/0"
    svc = Service(tmp_path / "svc", service_env(url, str(tiny_model_dir)), workers=1)
    try:
        response = stream(svc.base, "/completion/The capital of France is", max_new_tokens=3)
        assert response.last.event == "done" and response.text.startswith(" Paris")
        wrong = Service(
            tmp_path / "wrong",
            service_env(f"redis://:bad@127.0.0.1:{port}/0", str(tiny_model_dir)),
            workers=0,
        )
        try:
            assert httpx.get(wrong.base + "/completion/Hi").status_code == 503
        finally:
            wrong.stop()
    finally:
        svc.stop()
        proc.terminate()


def test_docs_work_offline_from_assets_this_process_serves(service):
    for path in ("/docs", "/redoc"):
        html = httpx.get(service.base + path).text
        assert "cdn." not in html and "fonts.googleapis" not in html
        for asset in re.findall(r'(?:src|href)="(/docs-assets/[^"]+)"', html):
            response = httpx.get(service.base + asset)
            assert response.status_code == 200 and len(response.content) > 1000, asset
    assert httpx.get(service.base + "/docs-assets/../../etc/passwd").status_code == 404


def test_a_failed_pipeline_is_logged_without_the_text_it_was_sending(
    redis_client, isolated_redis_url
):
    """redis-py quotes a failed pipeline command, arguments and all, in its error:
    a worker's write of a token's text that Redis refuses (READONLY after a
    failover, WRONGTYPE, OOM) would put that text in the log."""
    client = redis.Redis.from_url(isolated_redis_url)
    client.set("textstream:probe", "a string")
    pipe = client.pipeline(transaction=False)
    pipe.get("textstream:probe")
    pipe.xadd("textstream:probe", {"text": "quetzal 9931"})
    with pytest.raises(redis.ResponseError) as failed:
        pipe.execute()
    assert "quetzal" in str(failed.value)  # what redis-py itself says
    line = brief(failed.value)
    assert "quetzal" not in line and "9931" not in line
    assert line.startswith("ResponseError: WRONGTYPE"), line
    assert brief(ConnectionError("Connection refused")) == "ConnectionError: Connection refused"


def test_probes_log_at_debug_and_every_api_line_is_json(make_service):
    svc = make_service(workers=0)
    for _ in range(3):
        httpx.get(svc.base + "/health")
    httpx.get(svc.base + "/v1/models")
    time.sleep(0.5)
    lines = [line for line in svc.api.output().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # uvicorn's own lines included
    assert any(e.get("logger") == "uvicorn.error" for e in entries)
    routes = [e.get("route") for e in entries if e.get("msg") == "request"]
    assert "/v1/models" in routes and "/health" not in routes
