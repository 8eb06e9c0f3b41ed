"""One request, one key or one Redis blip never hurts anyone else.

Each test here is a regression test for a class of defect an outside review found
on a live deployment: keys that were not tenants, refusals that still queued work,
a queue bound that was not one, Redis trouble answered with 500s, odd bytes that
crashed a request, Last-Event-IDs that hung, prompts kept too long."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import Service
from helpers import free_port, parse_sse_lines, queued, service_env, stream, wait_for

from bench.cluster import start_api, start_redis

K1, K2 = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
KEYS = {"API_KEYS": "key-one,key-two"}


def sse(base: str, path: str, headers: dict[str, str], **params: Any) -> list[Any]:
    with httpx.stream("GET", base + path, headers=headers, params=params, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return parse_sse_lines(r.iter_lines())


def post_job(base: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    return httpx.post(base + "/jobs", json={"prompt": "Hello", **body}, headers=headers, timeout=10)


def raw_post(base: str, headers: dict[str, str], body: str) -> httpx.Response:
    """POST JSON text as given (json.dumps would refuse a lone surrogate)."""
    headers = {**headers, "content-type": "application/json"}
    return httpx.post(base + "/jobs", content=body, headers=headers, timeout=10)


# A worker's claim bookkeeping: ModelQ adds and removes these around every job it
# runs, on its own time (a job's `done` can reach the client before the worker
# drops its claim), so they say nothing about what a refused request created.
CLAIM_RECORDS = (b":processing_tasks", b":task_heartbeats")


def job_keys(client: redis.Redis) -> set[bytes]:
    """Everything a submitted job leaves in Redis: its stream and state, ModelQ's
    task record and queue entries, a cache entry."""
    found = set(client.keys("textstream:job:*")) | set(client.keys("task*"))
    found |= {k for k in client.keys("textstream:queue:*") if not k.endswith(CLAIM_RECORDS)}
    return found | set(client.keys("textstream:cache:*"))


@pytest.fixture(scope="module")
def keyed(slow_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two API keys, a response cache, one worker with the slow model, on a Redis of
    its own (so the key snapshots below see only this service)."""
    workdir = tmp_path_factory.mktemp("keyed")
    proc, url = start_redis(workdir)
    env = service_env(url, str(slow_model_dir), CACHE_TTL="600", **KEYS)
    svc = Service(workdir, env, workers=1, concurrency=2)
    yield svc, redis.Redis.from_url(url)
    svc.stop()
    proc.terminate()


# --- API keys are tenants -------------------------------------------------------------


def test_every_job_route_in_the_schema_answers_another_key_404(keyed):
    svc, _ = keyed
    schema = httpx.get(svc.base + "/openapi.json", headers=K1, timeout=10).json()
    job_id = post_job(svc.base, K1, max_new_tokens=200, ignore_eos=True).json()["id"]
    routes = [
        (method.upper(), path)
        for path, methods in schema["paths"].items()
        if "{job_id}" in path
        for method in methods
    ]
    assert {path for _, path in routes} >= {"/jobs/{job_id}", "/jobs/{job_id}/events"}
    for method, path in routes:
        url = svc.base + path.replace("{job_id}", job_id)
        foreign = httpx.request(method, url, headers=K2, timeout=10)
        assert foreign.status_code == 404, (method, path, foreign.text)
        assert foreign.json()["error"]["type"] == "not_found"
    # k2's DELETE changed nothing: the job is k1's, and still runs to its end.
    events = sse(svc.base, f"/jobs/{job_id}/events", K1)
    assert events[-1].event == "done"
    assert httpx.get(f"{svc.base}/jobs/{job_id}", headers=K1).json()["status"] == "done"


def test_the_response_cache_is_per_key(keyed):
    svc, _ = keyed
    params = {"max_new_tokens": 5, "ignore_eos": True}
    first = httpx.get(svc.base + "/completion/The capital", params=params, headers=K1)
    again = httpx.get(svc.base + "/completion/The capital", params=params, headers=K1)
    other = httpx.get(svc.base + "/completion/The capital", params=params, headers=K2)
    assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert again.headers["x-job-id"] == first.headers["x-job-id"]
    assert other.headers["x-cache"] == "miss"
    assert other.headers["x-job-id"] != first.headers["x-job-id"]


def test_a_global_cache_shares_answers_but_not_the_right_to_cancel(make_service):
    svc = make_service(model="fake:20", CACHE_TTL="600", CACHE_SCOPE="global", **KEYS)
    body = {"max_new_tokens": 5, "ignore_eos": True}
    mine = post_job(svc.base, K1, **body).json()["id"]
    theirs = post_job(svc.base, K2, **body).json()["id"]
    assert theirs == mine  # the same answer, shared
    assert httpx.get(f"{svc.base}/jobs/{mine}", headers=K2).status_code == 200
    assert httpx.delete(f"{svc.base}/jobs/{mine}", headers=K2).status_code == 404


def test_a_stream_token_with_odd_bytes_is_simply_not_a_token(keyed):
    svc, _ = keyed
    job = post_job(svc.base, K1, max_new_tokens=2).json()
    for token in ("x.y.z.\u00e9\u00e9\u00e9", "a" * 5000, job["events_token"] + "\u00ff"):
        response = httpx.get(svc.base + job["events_url"], params={"access_token": token})
        assert response.status_code == 401, token[:20]
    events = sse(svc.base, job["events_url"], {}, access_token=job["events_token"])
    assert events[-1].event == "done"


def test_stream_tokens_never_reach_the_logs(keyed):
    svc, _ = keyed
    job = post_job(svc.base, K1, max_new_tokens=2).json()
    sse(svc.base, job["events_url"], {}, access_token=job["events_token"])
    time.sleep(0.5)
    secret = job["events_token"].rsplit(".", 1)[1]
    assert secret not in svc.api.output() and "key-one" not in svc.api.output()


def test_a_body_without_a_valid_key_is_refused_before_it_is_read(keyed):
    """Only the head has arrived (the body is 80 bytes short, and never comes): a
    caller without the key gets its 401 at once, not after the API waited for and
    parsed a body it would refuse anyway."""
    svc, client = keyed
    before = job_keys(client)
    host, port = svc.base.removeprefix("http://").split(":")
    for path, credential in [
        ("/v1/completions", b""),
        ("/v1/chat/completions", b"Authorization: Bearer not-a-key\r\n"),
        ("/jobs", b""),
    ]:
        started = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: localhost\r\n".encode()
                + b"Content-Type: application/json\r\n"
                + credential
                + b'Content-Length: 100\r\n\r\n{"model": "m", "pro'
            )
            received = b""
            while b"}" not in received.rpartition(b"\r\n\r\n")[2]:
                received += sock.recv(65536)
        took = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 401"), (path, received[:200])
        assert b"www-authenticate: bearer" in received.lower() and took < 3, (path, took)
        body = json.loads(received.partition(b"\r\n\r\n")[2])
        shape = body["error"]["code"] if path.startswith("/v1") else body["error"]["type"]
        assert shape == "unauthorized", (path, body)
    assert job_keys(client) == before  # refused before anything was written
    # With the key, the same route is reached (and its body read).
    ok = httpx.post(svc.base + "/v1/completions", headers=K1, json={"model": "x", "prompt": ""})
    assert ok.status_code == 400 and ok.json()["error"]["param"] == "prompt"


def test_docs_and_schema_are_behind_the_key_when_keys_are_set(keyed, service):
    svc, _ = keyed
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(svc.base + path).status_code == 401, path
        assert httpx.get(svc.base + path, headers=K1).status_code == 200, path
        assert httpx.get(service.base + path).status_code == 200, path  # an open API
    # What README's Security section lists as open, and the operator's views that are not.
    for path in ("/health", "/version", "/"):
        assert httpx.get(svc.base + path).status_code == 200, path
    for path in ("/workers", "/metrics", "/ready", "/v1/models"):
        assert httpx.get(svc.base + path).status_code == 401, path


# --- a refusal writes nothing and queues nothing ----------------------------------------


def test_refusals_write_nothing(keyed):
    svc, client = keyed
    done = post_job(svc.base, K1, max_new_tokens=1).json()["id"]
    wait_for(
        lambda: httpx.get(f"{svc.base}/jobs/{done}", headers=K1).json()["status"] == "done",
        30,
        "a finished job",
    )
    before, waiting = job_keys(client), queued(client)
    refusals = [
        (401, lambda: post_job(svc.base, {})),
        (401, lambda: httpx.get(svc.base + "/completion/hi", headers={"Authorization": "x"})),
        (404, lambda: httpx.get(f"{svc.base}/jobs/{'f' * 32}", headers=K1)),
        (404, lambda: httpx.delete(f"{svc.base}/jobs/{done}", headers=K2)),
        (409, lambda: httpx.delete(f"{svc.base}/jobs/{done}", headers=K1)),
        (422, lambda: post_job(svc.base, K1, max_new_tokens=0)),
        (422, lambda: raw_post(svc.base, K1, '{"prompt": "hi", "stop": ["\\ud800"]}')),
        (422, lambda: httpx.get(svc.base + "/completion/%00", headers=K1)),
        # `/completion/.` reaches the API as `/completion`: still behind the key.
        (401, lambda: httpx.get(svc.base + "/completion/.")),
        (422, lambda: httpx.get(svc.base + "/completion/.", headers=K1)),
        (400, lambda: httpx.get(f"{svc.base}/jobs/{done}/events?last_event_id=x", headers=K1)),
    ]
    for status, call in refusals:
        assert call().status_code == status
    assert job_keys(client) == before and queued(client) == waiting


def test_refused_requests_do_not_use_up_the_rate_limit(make_service):
    svc = make_service(workers=0, RATE_LIMIT="3", **KEYS)
    for _ in range(10):
        assert post_job(svc.base, K1, max_new_tokens=0).status_code == 422
        assert httpx.get(f"{svc.base}/jobs/{'0' * 32}", headers=K1).status_code == 404
    accepted = [post_job(svc.base, K1).status_code for _ in range(4)]
    assert accepted == [202, 202, 202, 429]


def test_a_request_past_the_stream_cap_gets_429_and_is_never_run(make_service):
    svc = make_service(model="fake:20", MAX_STREAMS_PER_KEY="1", **KEYS)  # 300 tokens: 15 s
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    with httpx.stream(
        "GET",
        svc.base + "/completion/Hello",
        params={"max_new_tokens": 300, "ignore_eos": True},
        headers=K1,
        timeout=60,
    ) as holding:
        assert holding.status_code == 200
        before = job_keys(client)
        refused = [
            httpx.get(svc.base + "/completion/Other", headers=K1, timeout=10).status_code
            for _ in range(5)
        ]
        assert refused == [429] * 5
        assert job_keys(client) == before  # nothing queued, nothing generated
    # The slot comes back when the stream ends.
    wait_for(
        lambda: httpx.get(svc.base + "/completion/Hi", headers=K1, timeout=10).status_code == 200,
        30,
        "the stream slot to be released",
    )


def test_stream_slots_are_leases_a_killed_api_process_stops_holding(make_service):
    """A live API process keeps its callers' slots past many lease periods; one that
    is SIGKILLed holding them gives them up within a lease, and a restarted process
    inherits none (they were a fixed hour, released only by their holder)."""
    svc = make_service(
        model="fake:20", MAX_STREAMS_PER_KEY="2", API_LEASE_SECONDS="2", **KEYS
    )  # 300 tokens: 15 s a stream
    long = {"max_new_tokens": 300, "ignore_eos": True}
    held = [
        httpx.stream("GET", svc.base + "/completion/Hello", params=long, headers=K1, timeout=60)
        for _ in range(2)
    ]
    try:
        for response in held:
            assert response.__enter__().status_code == 200
        time.sleep(5)  # 2.5 leases: only renewals keep them
        assert httpx.get(svc.base + "/completion/Hi", headers=K1, timeout=10).status_code == 429
        assert svc.api.popen is not None
        svc.api.popen.kill()
        svc.api.popen.wait()
        svc.api, svc.base = start_api(svc.env, svc.workdir, name="api-again")
        wait_for(
            lambda: (
                httpx.get(svc.base + "/completion/Hi", headers=K1, timeout=10).status_code == 200
            ),
            10,  # a 2 s lease, with room for a loaded host
            "the dead process's stream slots to stop counting",
        )
    finally:
        for response in held:
            with contextlib.suppress(httpx.HTTPError):  # its server was killed
                response.__exit__(None, None, None)


def test_a_killed_api_process_s_reader_claims_are_released_and_its_jobs_stop(make_service):
    """/completion jobs whose only reader was on an API process that is SIGKILLed:
    the running one is cancelled and the queued one leaves the queue within a lease
    or two, by another API process (they generated, or kept their queue place, for
    nobody until their end)."""
    svc = make_service(model="fake:20", API_LEASE_SECONDS="2")  # one slot; 15 s a job
    other, other_base = start_api(svc.env, svc.workdir, name="api-b")
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    long = {"max_new_tokens": 300, "ignore_eos": True}
    try:
        streams = [
            httpx.stream("GET", svc.base + f"/completion/{q}", params=long, timeout=60)
            for q in ("One", "Two")
        ]
        opened = [s.__enter__() for s in streams]
        assert [o.status_code for o in opened] == [200, 200]
        ids = [o.headers["x-job-id"] for o in opened]
        lines = opened[0].iter_lines()
        while "event: token" not in next(lines):
            pass  # the first job is generating
        wait_for(lambda: queued(client) == 1, 10, "the second job to wait in the queue")
        time.sleep(1)  # a renewal or two: the claims are published
        assert svc.api.popen is not None
        svc.api.popen.kill()
        svc.api.popen.wait()
        killed_at = time.monotonic()
        for job_id in ids:
            events = stream(other_base, f"/jobs/{job_id}/events", timeout=30)
            assert events.last.event == "error", events.last
            assert events.last.data["error"]["type"] == "cancelled"
        assert time.monotonic() - killed_at < 10  # the first job alone had 14 s to go
        assert queued(client) == 0
    finally:
        other.stop()


def test_the_queue_bound_holds_under_a_burst_and_cancelled_jobs_stop_counting(make_service):
    # One caller may take the whole queue here: the bound itself is under test.
    svc = make_service(workers=0, MAX_QUEUED_JOBS="5", MAX_QUEUED_PER_CALLER="5")
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: post_job(svc.base, {}), range(50)))
    accepted = [a.json()["id"] for a in answers if a.status_code == 202]
    assert len(accepted) == 5 and sorted({a.status_code for a in answers}) == [202, 429]
    assert queued(client) == 5
    assert len(client.keys("textstream:job:*:events")) == 5  # refused ones left nothing
    for job_id in accepted:
        assert httpx.delete(f"{svc.base}/jobs/{job_id}").json()["status"] == "cancelled"
    assert queued(client) == 0 and not client.keys("task:*")
    assert [post_job(svc.base, {}).status_code for _ in range(6)] == [202] * 5 + [429]


def test_a_saturated_api_answers_429_not_503_and_writes_nothing(make_service):
    """The API process, not Redis, is the bottleneck: requests beyond MAX_SUBMITTING
    that wait ADMISSION_WAIT_SECONDS for a turn get 429 `server_busy`; the one in
    hand completes once Redis takes writes again."""
    svc = make_service(
        workers=0,
        MAX_SUBMITTING="1",
        ADMISSION_WAIT_SECONDS="0.3",
        ENQUEUE_TIMEOUT="10",
        # Above the 2 s pause: Redis lifts a pause on its next cron tick (up to 100 ms
        # late), and a write held past REDIS_TIMEOUT would fail as Redis trouble.
        REDIS_TIMEOUT="5",
        DEFAULT_MODEL="tiny-gpt2",
    )
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    assert post_job(svc.base, {}).status_code == 202
    # Redis holds every write for 2 s: the request whose turn it is stalls in hand.
    client.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: post_job(svc.base, {}, prompt=f"p{n}"), range(4)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [202, 429, 429, 429], (codes, [a.elapsed.total_seconds() for a in answers])
    for refused in (a for a in answers if a.status_code == 429):
        assert refused.json()["error"]["type"] == "server_busy"
        assert refused.headers["Retry-After"]
    assert queued(client) == 2 and len(client.keys("textstream:job:*:events")) == 2


def test_an_unclaimed_job_leaves_the_queue_at_its_deadline(make_service):
    svc = make_service(workers=0, JOB_TIMEOUT="1", HOUSEKEEPING_SECONDS="0.5")
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    job_id = post_job(svc.base, {}, prompt="zebra-unclaimed-secret").json()["id"]
    assert queued(client) == 1
    wait_for(lambda: queued(client) == 0, 15, "the expired job to leave the queue")
    status = httpx.get(f"{svc.base}/jobs/{job_id}").json()
    assert status["status"] == "error" and status["error"]["type"] == "timeout"
    assert not any(b"zebra-unclaimed" in (client.dump(k) or b"") for k in client.keys("*"))


# --- no prompt kept past JOB_TTL, nothing that grows forever ------------------------------


def test_modelq_keeps_no_prompt_and_no_history(service, redis_client):
    marker = "okapi-private-7781"
    response = stream(service.base, f"/completion/{marker} The capital", max_new_tokens=3)
    assert response.last.event == "done"
    job_id = response.headers["x-job-id"]
    time.sleep(0.5)  # ModelQ's final write comes after our task returns
    for key in redis_client.keys("*"):
        assert marker.encode() not in (redis_client.dump(key) or b""), key
    assert not redis_client.exists(f"task_history:{job_id}", f"task_result:{job_id}")
    assert redis_client.zscore("task_history", job_id) is None
    stub = json.loads(redis_client.get(f"task:{job_id}"))
    assert "payload" not in stub and stub["status"] == "completed"
    assert 0 < redis_client.ttl(f"task:{job_id}") <= 3600


# --- Redis trouble: 503, never 500, and recovery ------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path):
    port = free_port()
    state = {"proc": start_redis(tmp_path, port)[0]}

    def restart() -> None:
        state["proc"] = start_redis(tmp_path, port)[0]

    yield f"redis://127.0.0.1:{port}/0", state, restart
    state["proc"].terminate()
    state["proc"].wait(10)


def sample_request(path: str, method: str, model: str = "fake-50tps") -> dict[str, Any]:
    """A valid body for `method path` (`model`: the served name of MODEL_ID=fake:50)."""
    if path == "/v1/completions":
        return {"json": {"model": model, "prompt": "hi"}}
    if path == "/v1/chat/completions":
        return {"json": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}
    if path == "/jobs" and method == "POST":
        return {"json": {"prompt": "hi"}}
    return {}


def every_route(
    base: str, schema: dict[str, Any], job_id: str, headers: dict[str, str]
) -> Iterator[tuple[str, str, httpx.Response]]:
    """Call every route in the OpenAPI `schema` once, with a valid body; yield
    (path, METHOD, response)."""
    for path, methods in schema["paths"].items():
        concrete = path.replace("{job_id}", job_id).replace("{question}", "hi")
        for method in (m.upper() for m in methods):
            response = httpx.request(
                method, base + concrete, headers=headers, timeout=15, **sample_request(path, method)
            )
            yield path, method, response


def test_every_route_that_needs_redis_answers_503_while_it_is_away(own_redis, tmp_path):
    url, state, restart = own_redis
    env = service_env(url, "fake:50", RATE_LIMIT="1000", **KEYS)
    svc = Service(tmp_path / "svc", env, workers=0)
    try:
        schema = httpx.get(svc.base + "/openapi.json", headers=K1).json()
        job_id = post_job(svc.base, K1).json()["id"]
        state["proc"].kill()
        state["proc"].wait(10)
        for path, method, response in every_route(svc.base, schema, job_id, K1):
            if path in ("/health", "/version"):  # answered without Redis
                assert response.status_code == 200
                if path == "/health" and method == "GET":  # ... and it says Redis is away
                    assert response.json()["redis"] is False
                continue
            assert response.status_code == 503, (method, path, response.text)
            assert response.headers["retry-after"]
            if method == "HEAD":  # a probe's answer: no body
                continue
            error = response.json()["error"]
            assert error["message"]
            if path.startswith("/v1/"):
                assert error["type"] == "server_error" and error["code"]
            else:
                assert error["type"] in ("redis_unavailable", "queue_unavailable")
        restart()  # back, and empty: the API recovers by itself
        wait_for(lambda: post_job(svc.base, K1).status_code == 202, 20, "the API to recover")
    finally:
        svc.stop()


def test_a_redis_that_comes_back_empty_ends_open_streams_at_once(
    own_redis, slow_model_dir, tmp_path
):
    url, state, restart = own_redis
    env = service_env(url, str(slow_model_dir), REDIS_GRACE_SECONDS="5")
    svc = Service(tmp_path / "svc", env, workers=1)
    try:
        result: dict[str, Any] = {}
        params = {"max_new_tokens": 1000, "ignore_eos": True}
        reader = threading.Thread(
            target=lambda: result.update(r=stream(svc.base, "/completion/Hi", 120, **params))
        )
        reader.start()
        # And one waiting (queued: the worker has one slot) for a whole answer.
        whole = {**params, "stream": "false"}
        waiter = threading.Thread(
            target=lambda: result.update(
                w=httpx.get(svc.base + "/completion/Ho", params=whole, timeout=120)
            )
        )
        waiter.start()
        client = redis.Redis.from_url(url)
        wait_for(lambda: client.keys("textstream:job:*:events"), 30, "the job to start")
        time.sleep(1)
        state["proc"].terminate()
        state["proc"].wait(10)
        restart()  # no persistence: the job's stream and state are gone
        lost_at = time.monotonic()
        reader.join(60)
        ended = result["r"]
        assert time.monotonic() - lost_at < 10  # not JOB_TIMEOUT later
        assert ended.last.event == "error"
        assert ended.last.data["error"]["type"] == "redis_unavailable"
        waiter.join(60)
        lost = result["w"]  # its job's stream is gone too: a 503 to retry, not a 502
        assert lost.status_code == 503 and lost.headers["Retry-After"], lost.text
        assert lost.json()["error"]["type"] == "redis_unavailable"
        # The worker's custody lists are known to ModelQ's sweepers again, so a
        # worker killed from now on does not strand its job (and prompt) forever.
        wait_for(lambda: httpx.get(svc.base + "/health").json()["workers"] == 1, 30, "worker")
        assert stream(svc.base, "/completion/Hi", max_new_tokens=3).last.event == "done"
        # ModelQ alone never registers them again (each model has its own registry).
        assert any(client.smembers(k) for k in client.keys("textstream:queue:*:inflight_lists"))
    finally:
        svc.stop()


# --- odd bytes -------------------------------------------------------------------------


def test_odd_request_ids_are_replaced_and_never_crash(service):
    for value in (b"\xff\xfebad", b"a" * 10_000, b"two words", "caf\u00e9".encode()):
        response = httpx.get(service.base + "/health", headers={"X-Request-Id": value})
        assert response.status_code == 200
        assert len(response.headers["x-request-id"]) == 32
    kept = httpx.get(service.base + "/health", headers={"X-Request-Id": "req-42.a:b"})
    assert kept.headers["x-request-id"] == "req-42.a:b"


def test_an_oversized_request_head_gets_431_not_a_reset(service):
    response = httpx.get(service.base + "/health", headers={"X-Padding": "p" * 40_000})
    assert response.status_code == 431
    assert response.json()["error"]["type"] == "headers_too_large"
    # under /v1, in OpenAI's error shape, as every /v1 refusal
    openai = httpx.get(service.base + "/v1/models", headers={"X-Padding": "p" * 40_000})
    assert openai.status_code == 431
    assert openai.json()["error"]["code"] == "headers_too_large"
    assert openai.json()["error"]["type"] == "headers_too_large"
    assert httpx.get(service.base + "/health").status_code == 200


def raw_exchange(base: str, request: bytes, wait: float = 15.0) -> tuple[bytes, float]:
    """Send `request` on a fresh socket, read until the server closes it; the bytes
    and how long that took."""
    host, port = base.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        if request:
            sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received, time.monotonic() - started


def test_an_http_1_0_client_gets_its_stream_unchunked_ended_by_close(make_service):
    svc = make_service(model="fake:200")  # the framing is under test, not the model
    request = (
        b"GET /completion/Hello?max_new_tokens=5&use_cache=false HTTP/1.0\r\n"
        b"Host: localhost\r\n\r\n"
    )
    received, _ = raw_exchange(svc.base, request)
    head, _, body = received.partition(b"\r\n\r\n")
    headers = head.decode().lower()
    assert head.startswith(b"HTTP/1.1 200") and "text/event-stream" in headers
    assert "transfer-encoding" not in headers and "connection: close" in headers
    events = parse_sse_lines(body.decode().replace("\r\n", "\n").split("\n"))
    assert [e.event for e in events][-1] == "done"  # no chunk sizes in between
    assert len([e for e in events if e.event == "token"]) == 5
    # A JSON answer keeps its Content-Length; HTTP/1.1 streams stay chunked.
    health, _ = raw_exchange(svc.base, b"GET /health HTTP/1.0\r\n\r\n")
    assert b"content-length:" in health.lower() and health.endswith(b"}")
    chunked, _ = raw_exchange(
        svc.base,
        b"GET /completion/Hi?max_new_tokens=2 HTTP/1.1\r\n"
        b"Host: localhost\r\nConnection: close\r\n\r\n",
    )
    assert b"transfer-encoding: chunked" in chunked.lower()


def test_a_request_that_never_arrives_whole_gets_408_and_is_let_go(make_service):
    """A connection that sends nothing, half a head, or a body shorter than its
    Content-Length is held no longer than REQUEST_READ_SECONDS: held for ever, a few
    thousand of them from one client would exhaust the API's sockets."""
    svc = make_service(workers=0, REQUEST_READ_SECONDS="1.5")
    slow = {
        "nothing": b"",
        "half a head": b"GET /health HTTP/1.1\r\nHost: localhost\r\n",
        "short body": b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"model": "m", "pro',
    }
    with ThreadPoolExecutor(len(slow)) as pool:
        replies = pool.map(lambda request: raw_exchange(svc.base, request), slow.values())
        answers = dict(zip(slow, replies, strict=True))
    for name, (received, took) in answers.items():
        assert received.startswith(b"HTTP/1.1 408"), (name, received[:200])
        assert b"request_timeout" in received and 1.0 < took < 6, (name, took)
    # The request log says what the client saw (the app, left waiting for the body,
    # would have answered 400 into a closed connection).
    logged = [
        json.loads(line)
        for line in svc.api.output().splitlines()
        if line.startswith("{") and '"request"' in line
    ]
    assert [(e["route"], e["status"]) for e in logged if e["method"] == "POST"] == [
        ("/v1/completions", 408)
    ]
    # A request that takes its time but arrives whole within the bound is served.
    host, port = svc.base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for part in (
            b"GET /health HTTP/1.1\r\n",
            b"Host: localhost\r\n",
            b"Connection: close\r\n\r\n",
        ):
            sock.sendall(part)
            time.sleep(0.3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    # An answer that outlasts the bound is not cut by it (its request had arrived):
    # a job waiting for a worker streams its queue position on.
    with httpx.stream("GET", svc.base + "/completion/Hi", timeout=10) as response:
        until = time.monotonic() + 3.5
        lines = []
        for line in response.iter_lines():
            lines.append(line)
            if time.monotonic() > until:
                break
        assert response.status_code == 200 and "event: queued" in lines
        assert time.monotonic() > until  # still open, past twice the bound


def test_the_read_clock_never_cuts_an_answer_and_leaves_no_connection_untimed(make_service):
    svc = make_service(model="fake:20", REQUEST_READ_SECONDS="1.5", **KEYS)
    key = b"Authorization: Bearer key-one\r\n"
    # Three pipelined requests: a short stream, one that outlasts the clock (50
    # tokens at 20/s), then a POST whose body never comes. The third's time starts
    # when the second's answer ends; nothing is written inside that answer.
    pipelined = (
        b"GET /completion/A?max_new_tokens=3&ignore_eos=true HTTP/1.1\r\nHost: localhost\r\n"
        + key
        + b"\r\n"
        b"GET /completion/B?max_new_tokens=50&ignore_eos=true HTTP/1.1\r\nHost: localhost\r\n"
        + key
        + b"\r\n"
        b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        + key
        + b'Content-Length: 25\r\n\r\n{"prompt": "Hello th'
    )
    received, took = raw_exchange(svc.base, pipelined)
    answers, _, refusal = received.partition(b"HTTP/1.1 408")
    assert answers.count(b"HTTP/1.1 200") == 2 and answers.count(b"event: done") == 2
    assert answers.endswith(b"0\r\n\r\n")  # the second stream ended whole, then the 408
    assert b"request_timeout" in refusal and took > 2.5 + 1.5 - 0.5, took
    # A blank line after an answer begins no request, yet the connection is timed.
    received, took = raw_exchange(svc.base, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200") and took < 10, took
    # A 401 sent before a body: the connection ends with it (no body to skip, and
    # nothing read afterwards as a next request).
    for extra in (b"", b"Expect: 100-continue\r\n"):
        request = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\n"
        received, took = raw_exchange(svc.base, request + extra + b"\r\n")
        assert received.startswith(b"HTTP/1.1 401") and b"HTTP/1.1 408" not in received
        assert b"connection: close" in received.lower() and took < 1.0, took


def test_lone_surrogates_anywhere_get_a_4xx_naming_the_field(service):
    # Raw JSON: "\ud800" escapes decode to a lone surrogate, which UTF-8 cannot hold.
    def send(path: str, body: str) -> httpx.Response:
        return httpx.post(
            service.base + path, content=body, headers={"content-type": "application/json"}
        )

    job = send("/jobs", '{"prompt": "hi", "stop": ["a\\ud800"]}')
    assert job.status_code == 422 and job.json()["error"]["field"] == "stop"
    prompt = send("/jobs", '{"prompt": "hi \\udfff"}')
    assert prompt.status_code == 422 and prompt.json()["error"]["field"] == "prompt"
    openai = send("/v1/completions", '{"model": "m", "prompt": "hi", "stop": "\\ud800"}')
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "stop"
    chat = send(
        "/v1/chat/completions",
        '{"model": "m", "messages": [{"role": "user", "content": "x\\ud800"}]}',
    )
    assert chat.status_code == 400


def test_bodies_that_are_not_json_text_get_422_and_huge_ones_413(service):
    headers = {"content-type": "application/json"}
    for body in (b'{"prompt": "caf\xe9"}', b"[" * 100_000 + b"]" * 100_000):
        response = httpx.post(service.base + "/jobs", content=body, headers=headers)
        assert response.status_code == 422, response.text[:200]
        assert response.json()["error"]["type"] == "invalid_request"
    huge = json.dumps({"prompt": "x" * 2_000_000})
    response = httpx.post(service.base + "/jobs", content=huge, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"
    response = httpx.post(service.base + "/v1/completions", content=huge, headers=headers)
    error = response.json()["error"]  # OpenAI's shape under /v1
    assert response.status_code == 413 and error["code"] == "body_too_large" and error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_a_completion_resume_never_reaches_another_keys_job(make_service):
    """Last-Event-ID on /completion resumes only a job the caller's own request is
    answered by: another key sending the same URL with the first key's last id
    gets a job of its own from its start (not a 204, not the other's events); an
    id that is not an event id is refused before anything is queued; two identical
    resumes at once get the same rest."""
    svc = make_service(model="fake:200", CACHE_TTL="600", **KEYS)
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    url, params = "/completion/Shared words", {"max_new_tokens": "8", "ignore_eos": "true"}
    first = sse(svc.base, url, K1, **params)
    ids = [e.id for e in first if e.id]
    job_one = first[0].data["job_id"]
    other = httpx.get(
        svc.base + url, params=params, headers={**K2, "Last-Event-ID": ids[-1]}, timeout=30
    )
    assert other.status_code == 200 and other.headers["x-cache"] == "miss"
    assert other.headers["x-job-id"] != job_one and job_one not in other.text
    assert "event: queued" in other.text and "event: done" in other.text

    before = job_keys(client)
    refused = httpx.get(
        svc.base + url, params=params, headers={**K1, "Last-Event-ID": "1e3-0"}, timeout=10
    )
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "Last-Event-ID"
    assert job_keys(client) == before

    resume = {**K1, "Last-Event-ID": ids[2]}
    with ThreadPoolExecutor(2) as pool:
        rests = list(pool.map(lambda _: sse(svc.base, url, resume, **params), [0, 1]))
    assert [e.id for e in rests[0]] == [e.id for e in rests[1]] == ids[3:]


def test_stream_slot_leases_after_redis_comes_back_empty(redis_url):
    """Redis restarted without its data: the slots it held are gone, renewing does
    not bring them back (nor fail), and the caller opens streams up to its cap."""
    import asyncio

    import redis.asyncio as aioredis

    from textstream.api.errors import RateLimitedError
    from textstream.api.security import Caller, Guard
    from textstream.config import Settings

    async def scenario() -> list[bool]:
        url = f"{redis_url.rsplit('/', 1)[0]}/13"
        client = aioredis.Redis.from_url(url)
        await client.flushdb()
        guard = Guard(Settings(max_streams_per_key=1, api_lease_seconds=5), client)
        caller = Caller("key:one")
        held = await guard.open_stream(caller)
        refused = False
        try:
            await guard.open_stream(caller)
        except RateLimitedError:
            refused = True
        await client.flushdb()  # back empty
        await guard.renew_leases()
        again = await guard.open_stream(caller)
        await guard.close_stream(caller, held)
        await guard.close_stream(caller, again)
        left = await client.exists(f"textstream:streams:{caller.identity}")
        await client.flushdb()
        await client.close()
        return [held is not None, refused, again is not None, not left]

    assert asyncio.run(scenario()) == [True, True, True, True]
