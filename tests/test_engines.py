"""textstream in front of an engine users already run: the upstream here is a real
OpenAI-compatible server, a second textstream deployment's /v1 (its own Redis and
worker), and the relaying workers stream from it through the `openai` SDK."""

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
from conftest import Service
from helpers import service_env, stored_events, stream, wait_for

from bench.cluster import start_redis

PROMPT = "Once upon a time"
LONG = {"max_new_tokens": 1000, "ignore_eos": True, "prompt_format": "raw"}


@pytest.fixture(scope="module")
def upstream(slow_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    workdir = tmp_path_factory.mktemp("upstream")
    proc, url = start_redis(workdir)
    svc = Service(workdir, service_env(url, str(slow_model_dir)), workers=1, concurrency=2)
    yield svc, redis.Redis.from_url(url)
    svc.stop()
    proc.terminate()


@pytest.fixture(scope="module")
def relay(upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Two relaying worker processes, each streaming from the upstream."""
    up, _ = upstream
    workdir = tmp_path_factory.mktemp("relay")
    proc, url = start_redis(workdir)
    env = service_env(
        url, f"openai:{up.base}/v1#slow-gpt2", JOB_TIMEOUT="40", UPSTREAM_RETRY_SECONDS="4"
    )
    svc = Service(workdir, env, workers=2, concurrency=2)
    yield svc, redis.Redis.from_url(url)
    svc.stop()
    proc.terminate()


def upstream_jobs(client: redis.Redis) -> list[list[bytes]]:
    """Each upstream job's event names, newest last."""
    streams = sorted(client.keys("textstream:job:*:events"), key=lambda k: client.xrange(k)[0][0])
    return [[e.event.encode() for e in stored_events(client, k)] for k in streams]


def test_completions_and_chat_through_the_relay_match_the_upstream(upstream, relay):
    up, _ = upstream
    rel, _ = relay
    for client_base in (up.base, rel.base):
        assert httpx.get(client_base + "/v1/models").json()["data"][0]["id"] == "slow-gpt2"
    direct = openai.OpenAI(base_url=f"{up.base}/v1", api_key="x", max_retries=0)
    relayed = openai.OpenAI(base_url=f"{rel.base}/v1", api_key="x", max_retries=0)
    args = {"model": "slow-gpt2", "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    want = direct.completions.create(**args).choices[0].text
    got = relayed.completions.create(**args).choices[0].text
    assert got == want and len(want) > 20
    pieces = [
        c.choices[0].text for c in relayed.completions.create(**args, stream=True) if c.choices
    ]
    assert "".join(pieces) == want
    chat = {"model": "slow-gpt2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
    assert (
        relayed.chat.completions.create(**chat, temperature=0).choices[0].message.content
        == direct.chat.completions.create(**chat, temperature=0).choices[0].message.content
    )
    native = stream(rel.base, f"/completion/{PROMPT}", max_new_tokens=40, prompt_format="raw")
    assert native.text == want and native.last.data["usage"]["completion_tokens"] == 40


def test_cancelling_a_relayed_stream_cancels_the_upstream_job(upstream, relay):
    _, up_redis = upstream
    rel, _ = relay
    with httpx.stream("GET", rel.base + f"/completion/{PROMPT}", params=LONG, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # the client leaves
    wait_for(lambda: upstream_jobs(up_redis)[-1][-1] == b"error", 15, "the upstream job to end")
    up_job = [k for k in up_redis.keys("textstream:job:*:events")]
    newest = max(up_job, key=lambda k: up_redis.xrange(k)[0][0])
    assert b'"cancelled"' in up_redis.xrange(newest)[-1][1][b"data"]


def test_a_killed_relaying_worker_is_taken_over_with_identical_text(upstream, relay):
    up, _ = upstream
    rel, rel_redis = relay
    params = {"max_new_tokens": 300, "ignore_eos": True, "prompt_format": "raw"}
    reference = stream(up.base, f"/completion/{PROMPT}", 60, **params)
    result: dict[str, Any] = {}
    reader = threading.Thread(
        target=lambda: result.update(r=stream(rel.base, f"/completion/{PROMPT}", 90, **params))
    )
    reader.start()

    def running_worker() -> int | None:
        for worker in httpx.get(rel.base + "/workers").json()["workers"]:
            if worker["busy"]:
                return int(worker["pid"])
        return None

    wait_for(lambda: running_worker() is not None, 30, "a relaying worker to take the job")
    wait_for(
        lambda: (
            sum(
                e.event == "token"
                for k in rel_redis.keys("textstream:job:*:events")
                for e in stored_events(rel_redis, k)
            )
            > 50
        ),
        30,
        "tokens",
    )
    pid = running_worker()
    assert pid, "the job ended before its worker could be killed"
    os.kill(pid, signal.SIGKILL)
    reader.join(90)
    relayed = result["r"]
    assert relayed.last.event == "done", relayed.events[-3:]
    assert relayed.of("resumed")  # another worker continued
    assert relayed.text == reference.text  # nothing lost, nothing doubled


def test_a_schema_is_passed_to_the_upstream_which_enforces_it(relay):
    """The relaying worker cannot constrain tokens it does not pick: it sends the
    schema on as the upstream's own response_format."""
    rel, _ = relay
    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": person}}
    relayed = openai.OpenAI(base_url=f"{rel.base}/v1", api_key="x", max_retries=0)
    answer = relayed.chat.completions.create(
        model="slow-gpt2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=60,
        temperature=0,
        response_format=fmt,  # type: ignore[arg-type]
    )
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    assert set(json.loads(answer.choices[0].message.content or "")) == {"name", "age"}


def test_a_tool_round_trip_through_the_relay(relay):
    """tools and tool_choice pass through; the upstream (a textstream, which forces
    the call) sends tool-call deltas, which come back as OpenAI tool calls,
    streamed and not; the call and its result, sent back, get a text answer."""
    rel, _ = relay
    relayed = openai.OpenAI(base_url=f"{rel.base}/v1", api_key="x", max_retries=0)
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": weather}}
    ask: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    common: dict[str, Any] = {"model": "slow-gpt2", "max_tokens": 40, "temperature": 0}
    answer = relayed.chat.completions.create(
        **common, messages=ask, tools=[tool], tool_choice="required", parallel_tool_calls=False
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    call = (choice.message.tool_calls or [])[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]
    chunks = list(
        relayed.chat.completions.create(
            **common, messages=ask, tools=[tool], tool_choice="required", stream=True
        )
    )
    streamed = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in streamed] == ["get_weather"]  # type: ignore[union-attr]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    back = [
        *ask,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    # /v1/responses through the relay: its named choice goes on in chat's shape.
    named = relayed.responses.create(
        model="slow-gpt2",
        input="Weather in Paris?",
        tools=[{"type": "function", "name": "get_weather", "parameters": weather}],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40,
        temperature=0,
    )
    assert [item.type for item in named.output] == ["function_call"], named.output
    final = relayed.chat.completions.create(**common, messages=back, tools=[tool])
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content is not None and not final.choices[0].message.tool_calls


def test_logprobs_on_a_relayed_model_are_the_upstreams(relay, upstream):
    """The relaying engine asks its upstream for logprobs and relays what it
    sends, in OpenAI's shapes (chat and the legacy completions), streamed or not.
    (Before the test that kills the upstream: it asks the upstream directly too.)"""
    rel, _ = relay
    up, _ = upstream
    relayed = openai.OpenAI(base_url=f"{rel.base}/v1", api_key="x", max_retries=0)
    direct = openai.OpenAI(base_url=f"{up.base}/v1", api_key="x", max_retries=0)
    args = {"model": "slow-gpt2", "prompt": "Hi", "max_tokens": 5, "temperature": 0}
    want = direct.completions.create(**args, logprobs=2).choices[0].logprobs
    got = relayed.completions.create(**args, logprobs=2).choices[0].logprobs
    assert got.tokens == want.tokens and got.token_logprobs == want.token_logprobs
    assert got.top_logprobs == want.top_logprobs and got.text_offset == want.text_offset
    chat = {
        "model": "slow-gpt2",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    want_chat = direct.chat.completions.create(**chat).choices[0].logprobs.content
    chunks = list(relayed.chat.completions.create(**chat, stream=True))
    got_chat = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.model_dump() for t in got_chat] == [t.model_dump() for t in want_chat]


# Last: the upstream stays dead after it.
def test_the_upstream_going_away_ends_the_stream_with_a_clear_event(upstream, relay):
    up, _ = upstream
    rel, _ = relay
    result: dict[str, Any] = {}
    reader = threading.Thread(
        target=lambda: result.update(r=stream(rel.base, f"/completion/{PROMPT}", 90, **LONG))
    )
    reader.start()
    time.sleep(3)
    up.api.stop(signal.SIGKILL)  # the upstream API dies mid-stream, and stays dead
    reader.join(90)
    ended = result["r"]
    assert ended.last.event == "error"
    assert ended.last.data["error"]["type"] == "upstream_error"
    assert ended.of("token")  # what came before it was delivered
