"""An upstream that misbehaves: a real HTTP server speaking (or failing to speak)
OpenAI's streaming protocol, in front of which textstream's relaying worker must
still end every job clearly, within what the client asked for, with honest usage.

The prompt picks the misbehaviour (the server reads it from the request body)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import openai
import pytest
import redis
from helpers import completion_chunk, start_event_stream, stream, wait_for

MODES = (
    "endless",
    "not-a-stream",
    "garbage",
    "usage-lies",
    "cut-short",
    "done-then-junk",
    "reasoning",
    "tool-split",
    "tool-no-index",
    "tool-args-object",
    "tool-huge-args",
    "tool-undeclared",
)
#: What each hostile tool mode sends as its one tool-call delta.
BAD_CALLS: dict[str, dict[str, Any]] = {
    "tool-no-index": {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}},
    "tool-args-object": {"index": 0, "function": {"name": "f", "arguments": {"a": 1}}},
    "tool-huge-args": {"index": 0, "function": {"name": "f", "arguments": "x" * (1 << 20)}},
    "tool-undeclared": {"index": 0, "function": {"name": "rm_rf", "arguments": "{}"}},
}


def chat_chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    body = {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "hostile"}
    return b"data: " + json.dumps({**body, "choices": [choice]}).encode() + b"\n\n"


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    asked: ClassVar[list[dict[str, Any]]] = []  # every request body, in order

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # /v1/models
        self._json(200, {"object": "list", "data": [{"id": "hostile", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        Hostile.asked.append(body)
        mode = next(m for m in MODES if m in json.dumps(body))
        if mode == "not-a-stream":  # a 200 that is an HTML page
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", "17")
            self.end_headers()
            self.wfile.write(b"<html>oops</html>")
            return
        send = start_event_stream(self)
        try:
            if mode == "endless":  # ignores max_tokens
                for i in range(3000):
                    send(completion_chunk(f" w{i}"))
            elif mode == "garbage":
                send(completion_chunk(" w0"))
                send(b"data: {not json at all\n\n")
                return
            elif mode == "usage-lies":
                for i in range(3):
                    send(completion_chunk(f" w{i}", "stop" if i == 2 else None))
                usage = {"prompt_tokens": -5, "completion_tokens": 99999999999}
                send(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            elif mode == "cut-short":  # three pieces, then the end with no finish reason
                for i in range(3):
                    send(completion_chunk(f" w{i}"))
            elif mode == "reasoning":  # as DeepSeek and OpenAI lay it out
                for i in range(3):
                    send(chat_chunk({"reasoning_content": f" r{i}"}))
                send(chat_chunk({}, "stop"))  # the finish alone, then the usage alone
                usage = {"prompt_tokens": 7, "completion_tokens": 3}
                send(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
            elif mode == "tool-split":  # as OpenAI streams two parallel calls
                start = {"id": "u1", "type": "function", "function": {"name": "f", "arguments": ""}}
                send(chat_chunk({"role": "assistant", "content": "Looking."}))
                send(chat_chunk({"tool_calls": [{"index": 0, **start}]}))  # type: ignore[dict-item]
                for part in ['{"city": ', '"Paris"', "}"]:
                    delta = [{"index": 0, "function": {"arguments": part}}]
                    send(chat_chunk({"tool_calls": delta}))  # type: ignore[dict-item]
                again = {"index": 1, "id": "u2", "function": {"name": "f", "arguments": "{}"}}
                send(chat_chunk({"tool_calls": [again]}))  # type: ignore[dict-item]
                send(chat_chunk({}, "tool_calls"))
            elif mode in BAD_CALLS:
                send(chat_chunk({"tool_calls": [BAD_CALLS[mode]]}))  # type: ignore[dict-item]
                send(chat_chunk({}, "tool_calls"))
            elif mode == "done-then-junk":  # whole, then a broken chunk instead of [DONE]
                send(completion_chunk(" w0"))
                send(completion_chunk(" w1", "stop"))
                send(b"data: {oops\n\n")
                return
            send(b"data: [DONE]\n\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def relay(make_service, hostile: str):
    return make_service(
        model=f"openai:{hostile}#hostile", UPSTREAM_RETRY_SECONDS="2", JOB_TIMEOUT="60"
    )


RAW = {"prompt_format": "raw", "ignore_eos": True}


def test_an_upstream_that_ignores_max_tokens_is_cut_off_at_it(relay):
    response = stream(relay.base, "/completion/endless", 30, max_new_tokens=5, **RAW)
    assert response.last.event == "done", response.events[-2:]
    assert len(response.of("token")) == 5
    assert response.last.data["finish_reason"] == "length"
    assert response.last.data["usage"]["completion_tokens"] == 5


def test_a_stream_cut_short_is_retried_for_only_what_is_left(relay):
    Hostile.asked.clear()
    response = stream(relay.base, "/completion/cut-short", 30, max_new_tokens=5, **RAW)
    assert response.last.event == "done", response.events[-2:]
    assert response.text == " w0 w1 w2 w0 w1"  # 3, then the 2 left: never more
    assert [body["max_tokens"] for body in Hostile.asked] == [5, 2]
    assert Hostile.asked[1]["prompt"].endswith("cut-short w0 w1 w2")  # resumed after


def test_what_fails_after_the_finish_reason_leaves_the_answer_whole(relay):
    Hostile.asked.clear()
    response = stream(relay.base, "/completion/done-then-junk", 30, max_new_tokens=5, **RAW)
    assert response.last.event == "done", response.events[-2:]
    assert response.text == " w0 w1" and response.last.data["finish_reason"] == "stop"
    assert len(Hostile.asked) == 1  # no retry asking for more after the end


@pytest.mark.parametrize("mode", ["not-a-stream", "garbage"])
def test_an_answer_that_is_no_completion_stream_is_an_upstream_error(relay, mode):
    Hostile.asked.clear()
    started = time.monotonic()
    response = stream(relay.base, f"/completion/{mode}", 30, max_new_tokens=5, **RAW)
    assert response.last.event == "error", response.events[-2:]
    assert response.last.data["error"]["type"] == "upstream_error"
    assert time.monotonic() - started < 15  # within the retry window, not JOB_TIMEOUT
    assert len(Hostile.asked) == 1  # the same answer again would be no better
    assert "garbage" not in relay.workers.output()  # the prompt never reaches the log


def test_usage_the_upstream_cannot_mean_is_not_passed_on(relay):
    response = stream(relay.base, "/completion/usage-lies", 30, max_new_tokens=5, **RAW)
    assert response.last.event == "done"
    assert response.last.data["usage"]["completion_tokens"] == 3
    assert response.last.data["usage"]["prompt_tokens"] >= 0


def test_credentials_in_the_upstream_url_are_shown_nowhere(make_service, hostile: str):
    url = hostile.replace("http://", "http://relay:s3cr3t-pw@")
    svc = make_service(model=f"openai:{url}#hostile", UPSTREAM_RETRY_SECONDS="2")
    response = stream(svc.base, "/completion/usage-lies", 30, max_new_tokens=5, **RAW)
    assert response.last.event == "done"  # the URL with its credentials was used
    workers = httpx.get(svc.base + "/workers", timeout=10).json()["workers"]
    assert workers and workers[0]["device"] == hostile.replace("http://", "http://***@")
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    stored = repr([client.hgetall(key) for key in client.keys("*") if client.type(key) == b"hash"])
    for seen in (svc.workers.output(), svc.api.output(), json.dumps(workers), str(stored)):
        assert "s3cr3t" not in seen


def test_tokenize_for_a_model_without_a_tokenizer_here_is_a_clear_4xx(relay):
    """The API cannot load an upstream's tokenizer: after it tried, a 400 naming
    `model` (a 503 "retry shortly" would be retried for ever)."""

    def answer() -> httpx.Response:
        body = {"model": "hostile", "prompt": "Hi"}
        return httpx.post(relay.base + "/tokenize", json=body, timeout=10)

    wait_for(lambda: answer().status_code != 503, 30, "the API to try the tokenizer")
    refused = answer()
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "model"


def test_reasoning_up_to_the_limit_closes_its_block_and_keeps_the_usage(relay):
    """Three reasoning pieces for max 3, then the finish reason in a chunk of its
    own: the `</think>` the relay adds there is no fourth piece to cut off."""
    response = stream(relay.base, "/completion/reasoning", 30, max_new_tokens=3)
    assert response.last.event == "done", response.events[-2:]
    assert "".join(e.data["text"] for e in response.of("thinking")) == " r0 r1 r2"
    assert response.last.data["finish_reason"] == "stop"
    assert response.last.data["usage"] == {"prompt_tokens": 7, "completion_tokens": 3}


def test_an_upstream_url_is_shown_without_user_info_or_query_values():
    from textstream.sources import without_credentials

    shown = {
        "http://gpu-1:8000/v1": "http://gpu-1:8000/v1",
        "http://user:pw@gpu-1:8000/v1": "http://***@gpu-1:8000/v1",
        "https://u:p%40ss@[::1]:8443/v1": "https://***@[::1]:8443/v1",
        "https://a@b:c@host/v1": "https://***@host/v1",  # the last @ ends the user info
        "https://host/v1?api_key=s3cr3t&x=1": "https://host/v1?api_key=***&x=***",
    }
    for url, expected in shown.items():
        assert without_credentials(url) == expected


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_an_upstreams_streamed_tool_calls_come_back_whole(relay):
    """Tools, the choice and the conversation's calls and results pass through;
    the upstream's call deltas (split, two in parallel) become OpenAI tool calls,
    streamed and not."""
    client = openai.OpenAI(base_url=relay.base + "/v1", api_key="x", max_retries=0)
    earlier = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages: list[Any] = [
        {"role": "user", "content": "tool-split"},
        {"role": "assistant", "content": None, "tool_calls": [earlier]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    asked = {"model": "hostile", "messages": messages, "tools": [TOOL], "tool_choice": "auto"}
    for streamed in (False, True):
        Hostile.asked.clear()
        if streamed:
            chunks = list(client.chat.completions.create(**asked, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            answer = client.chat.completions.create(**asked).choices[0]
            text, finish = answer.message.content or "", answer.finish_reason
            calls = answer.message.tool_calls or []  # type: ignore[assignment]
        assert finish == "tool_calls" and text == "Looking."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [  # type: ignore[union-attr]
            ("f", {"city": "Paris"}),
            ("f", {}),
        ]
        sent = Hostile.asked[0]
        assert sent["tools"] == [TOOL] and sent["tool_choice"] == "auto"
        assert sent["messages"][1]["tool_calls"][0]["id"] == "call_1"
        assert sent["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_malformed_tool_call_deltas_are_an_upstream_error(relay):
    """No index, arguments that are no text, 1 MB of them, an undeclared name:
    each ends the job with a clear upstream_error (a 502), at once."""
    for mode in sorted(BAD_CALLS):
        started = time.monotonic()
        body = {
            "model": "hostile",
            "messages": [{"role": "user", "content": mode}],
            "tools": [TOOL],
        }
        answer = httpx.post(relay.base + "/v1/chat/completions", json=body, timeout=30)
        assert answer.status_code == 502, (mode, answer.text)
        assert answer.json()["error"]["type"] == "upstream_error"
        assert time.monotonic() - started < 15
    # Streamed: the stream ends with OpenAI's error object, not a hang.
    body = {**body, "messages": [{"role": "user", "content": "tool-undeclared"}], "stream": True}
    with httpx.stream("POST", relay.base + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["type"] == "upstream_error"
    assert "tool-huge-args" not in relay.workers.output()  # nor the prompt in the log


def test_a_takeover_in_the_calls_skips_the_published_ones_and_the_text():
    """Calls are published whole; a worker taking over asks again and drops the new
    answer's text and the calls already published: none is doubled or cut."""
    from textstream.engines.openai import _ToolCalls
    from textstream.job import CompletionJob

    job = CompletionJob(job_id="j", prompt="", messages=[], tools=[TOOL])
    deltas = [
        {"index": 0, "function": {"name": "f", "arguments": '{"a": '}},
        {"index": 0, "function": {"arguments": "1}"}},
        {"index": 1, "function": {"name": "f", "arguments": "{}"}},
    ]
    first = _ToolCalls(job, 1000, skip=0)
    published = first.add(deltas[:2], finished=False)
    assert published == ""  # the call is not whole until the next begins
    published += first.add(deltas[2:], finished=False)
    assert published == '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    again = _ToolCalls(job, 1000, skip=published.count("<tool_call>"))
    assert again.skip_text
    rest = again.add(deltas, finished=True)
    assert rest == '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
