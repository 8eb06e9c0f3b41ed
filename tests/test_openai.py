"""The OpenAI-compatible API, driven by the official `openai` SDK, unmodified."""

from __future__ import annotations

import concurrent.futures
import json
import math

import httpx
import openai
import pytest
import redis
from clients import run_client
from helpers import stream, wait_for
from test_jobs import create, read_some
from tiny_models import TRAINED

from textstream.api.errors import JOB_ERROR_STATUS
from textstream.engines.base import LogprobsError
from textstream.engines.fake import FakeEngine
from textstream.job import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.base}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client, tiny_model_dir):
    assert [m.id for m in client.models.list().data] == [tiny_model_dir.name]


def test_completion_non_streaming(client, tiny_model_dir):
    result = client.completions.create(
        model="tiny-gpt2", prompt=PROMPT, max_tokens=5, temperature=0
    )
    choice = result.choices[0]
    assert TRAINED[PROMPT].startswith(choice.text) and choice.text.startswith(" Paris.")
    assert choice.finish_reason == "length"
    assert result.model == tiny_model_dir.name and result.object == "text_completion"
    assert result.usage.completion_tokens == 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + 5


def test_completion_streaming_with_usage_matches_non_streaming(client):
    whole = client.completions.create(
        model="tiny-gpt2", prompt=PROMPT, max_tokens=40, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny-gpt2",
            prompt=PROMPT,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text == TRAINED[PROMPT]
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == ["stop"]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_chat_completion_streaming_and_not(client):
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(
        model="tiny-gpt2", messages=messages, max_tokens=15, temperature=0
    )
    assert whole.object == "chat.completion"
    message = whole.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    chunks = list(
        client.chat.completions.create(
            model="tiny-gpt2",
            messages=messages,
            max_completion_tokens=15,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_string_is_cut_and_never_half_streamed(client, service):
    kwargs = {
        "model": "tiny-gpt2",
        "prompt": PROMPT,
        "max_tokens": 40,
        "temperature": 0,
        "stop": [" of Jap"],
    }
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == " Paris. The capital"
    assert whole.choices[0].finish_reason == "stop"
    pieces = [
        c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices
    ]
    assert "".join(pieces) == " Paris. The capital"
    # Native endpoint, same parameters.
    native = stream(service.base, f"/completion/{PROMPT}", max_new_tokens=40, stop=" of Jap")
    assert native.text == " Paris. The capital" and native.last.data["finish_reason"] == "stop"


def test_penalties_and_extra_fields_are_accepted(client):
    # Untrained text: greedy output repeats itself, which is what penalties act on.
    common = {"model": "tiny-gpt2", "prompt": "Hello", "max_tokens": 30, "temperature": 0}
    plain = client.completions.create(**common, extra_body={"ignore_eos": True})
    penalized = client.completions.create(
        **common,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        seed=3,
        user="someone",
        extra_body={"top_k": 5, "repetition_penalty": 1.3, "ignore_eos": True},
    )
    assert plain.usage.completion_tokens == penalized.usage.completion_tokens == 30
    assert penalized.choices[0].text != plain.choices[0].text


def test_null_means_unset_for_optional_fields_as_openai_takes_it(service):
    """Clients that send every field, unset ones as null, get the defaults."""
    unset = ["temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream"]
    unset += ["logprobs", "top_logprobs", "seed", "stop", "user", "stream_options"]
    unset += ["response_format", "tools", "tool_choice", "top_k", "ignore_eos"]
    nulls = dict.fromkeys(unset)
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"prompt": PROMPT, "echo": None}),
    ):
        answer = httpx.post(
            service.base + path,
            json={"model": "tiny-gpt2", "max_tokens": 2, **nulls, **body},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 2
    refused = httpx.post(
        service.base + "/v1/completions", json={"model": "tiny-gpt2", "prompt": None}, timeout=30
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"n": 16, "max_tokens": 100}, "n"),  # 1600 tokens: past MAX_NEW_TOKENS_LIMIT
        ({"n": 2, "prompt": [PROMPT] * 17}, "n"),  # 34 jobs: past MAX_PROMPTS
        ({"logprobs": 6}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ["x" * 101]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"model": ""}, "model"),
        ({"best_of": 0}, "best_of"),
        ({"extra_body": {"top_k": 2**70}}, "top_k"),
        ({"extra_body": {"min_p": 0.1}}, "min_p"),
        ({"extra_body": {"min_p": "abc"}}, "min_p"),
        # JSON's types, as OpenAI checks them: no number as text, no flag as a number.
        ({"extra_body": {"temperature": "0.5"}}, "temperature"),
        ({"extra_body": {"temperature": True}}, "temperature"),
        ({"extra_body": {"max_tokens": True}}, "max_tokens"),
        ({"extra_body": {"n": "1"}}, "n"),
        ({"extra_body": {"seed": "7"}}, "seed"),
        ({"extra_body": {"ignore_eos": "yes"}}, "ignore_eos"),
    ],
)
def test_invalid_requests_raise_openai_errors(client, kwargs, param):
    args = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 5, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**args)
    assert caught.value.status_code == 400
    message = caught.value.body["message"]
    assert caught.value.body["param"] == param and message
    assert "pydantic" not in message and "http" not in message  # says what is wrong
    if param == "stop":
        assert "stop string" in message


def test_json_types_are_held_but_off_values_and_integral_numbers_pass(client, service):
    answer = client.completions.create(
        model="tiny-gpt2",
        prompt=PROMPT,
        max_tokens=2,
        temperature=0,  # an int where a float is declared: a JSON number all the same
        extra_body={"min_p": 0, "ignore_eos": True},
    )
    assert answer.usage.completion_tokens == 2
    # The native JSON body holds the same types; its query string stays text.
    body = {"prompt": "Hi", "max_new_tokens": 2, "temperature": "0"}
    refused = httpx.post(service.base + "/jobs", json=body)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "temperature"
    assert httpx.post(service.base + "/jobs", json={**body, "temperature": 0}).status_code == 202
    query = {"temperature": "0", "max_new_tokens": "2", "stream": "false", "ignore_eos": "true"}
    answer = httpx.get(service.base + "/completion/Hi", params=query, timeout=30)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def test_a_served_model_can_be_retrieved_by_name(client, tiny_model_dir):
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_refuses_functions_and_a_required_tool_choice(client):
    message = [{"role": "user", "content": "x"}]
    for extra, param in (
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"function_call": {"name": "f"}}, "function_call"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny-gpt2", messages=message, **extra)
        assert caught.value.body["param"] == param
    # "none" and "auto" without tools offer nothing: answered as usual.
    answer = client.chat.completions.create(
        model="tiny-gpt2", messages=message, max_tokens=1, tool_choice="none"
    )
    assert answer.usage.completion_tokens == 1


def test_chat_refuses_malformed_tools_and_empty_messages(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-gpt2", messages=[])
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"parameters": {}}}],
        )
    assert caught.value.body["param"] == "tools"


def test_non_streaming_native_completion(service):
    response = httpx.get(
        f"{service.base}/completion/{PROMPT}", params={"stream": "false", "max_new_tokens": 40}
    )
    body = response.json()
    assert response.status_code == 200 and body["text"] == TRAINED[PROMPT]
    assert body["finish_reason"] == "stop" and body["usage"]["completion_tokens"] > 0


def test_completions_take_the_prompt_as_raw_text_with_openais_defaults(client, service):
    # 16 tokens unless told otherwise, as OpenAI's completions.
    result = client.completions.create(
        model="tiny-gpt2", prompt="Hello", extra_body={"ignore_eos": True}
    )
    assert result.usage.completion_tokens == 16
    assert result.usage.prompt_tokens == 1  # "Hello" is one GPT-2 token: no template around it
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-gpt2", prompt="Hello", max_tokens=10**6)
    assert caught.value.body["param"] == "max_tokens"  # the name the client sent
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "x"}],
            max_completion_tokens=10**6,
        )
    assert caught.value.body["param"] == "max_completion_tokens"


def test_tokenize_detokenize_and_version_as_vllm_serves_them(service):
    def tokenize(**body):
        response = httpx.post(
            service.base + "/tokenize", json={"model": "tiny-gpt2", **body}, timeout=10
        )
        return response

    wait_for(lambda: tokenize(prompt="x").status_code == 200, 30, "the API's tokenizer")
    body = tokenize(prompt="Hello world", return_token_strs=True).json()
    assert body["tokens"] == [15496, 995] and body["count"] == 2  # GPT-2's real tokenizer
    assert body["max_model_len"] == 1024 and body["token_strs"] == ["Hello", "Ġworld"]
    chat = tokenize(messages=[{"role": "user", "content": "Hi"}]).json()
    layout = httpx.post(service.base + "/tokenize", json={"prompt": "User: Hi\nAssistant:"})
    assert chat["tokens"] == layout.json()["tokens"]  # the worker's chat layout for GPT-2
    detok = httpx.post(
        service.base + "/detokenize", json={"model": "tiny-gpt2", "tokens": [15496, 995]}
    )
    assert detok.json() == {"prompt": "Hello world"}
    assert httpx.post(service.base + "/detokenize", json={"tokens": [10**9]}).status_code == 422
    assert tokenize().status_code == 422  # neither prompt nor messages
    # A chat is held to the prompt's character limit as a prompt is (16 characters a
    # token of the 1,024-token window here: submit.CHARS_PER_TOKEN).
    huge = tokenize(messages=[{"role": "user", "content": "x" * (16 * 1024 + 1)}])
    assert huge.status_code == 422 and huge.json()["error"]["field"] == "messages"
    # ... counted as a job counts a chat: 28,000 empty messages are not "no text".
    many = tokenize(messages=[{"role": "user", "content": ""}] * 28_000)
    assert many.status_code == 422 and many.json()["error"]["field"] == "messages"
    # Ids past the context window (1,024 here) are no text this model reads or writes.
    long = httpx.post(service.base + "/detokenize", json={"tokens": [15496] * 1025})
    assert long.status_code == 422 and long.json()["error"]["field"] == "tokens"
    from textstream import __version__

    assert httpx.get(service.base + "/version").json() == {"version": __version__}


def test_litellm_and_langchain_know_our_context_errors_and_batch_prompts(service):
    """A prompt over the window is the error these clients know: litellm's
    ContextWindowExceededError, langchain's ContextOverflowError (they catch it to
    trim the conversation and retry). langchain's `OpenAI.batch` sends its prompts
    as one list, answered in order. (One client process: importing them is slow.)"""
    wait_for(
        lambda: httpx.post(service.base + "/tokenize", json={"prompt": "x"}).is_success,
        30,
        "the API's tokenizer",
    )
    seen = run_client(
        """
        import json, os
        import litellm
        from langchain_core.exceptions import ContextOverflowError
        from langchain_openai import ChatOpenAI, OpenAI

        base, long = os.environ["BASE"] + "/v1", "word " * 1100
        seen = {}
        try:
            litellm.completion(
                model="openai/tiny-gpt2", api_base=base, api_key="unused", max_tokens=2,
                messages=[{"role": "user", "content": long}],
            )
        except litellm.ContextWindowExceededError as exc:
            seen["litellm"] = exc.status_code
        try:
            ChatOpenAI(base_url=base, api_key="unused", model="tiny-gpt2").invoke(long)
        except ContextOverflowError as exc:
            seen["langchain"] = type(exc).__name__
        llm = OpenAI(
            base_url=base, api_key="unused", model="tiny-gpt2", max_tokens=8, temperature=0
        )
        seen["batch"] = llm.batch(["The capital of France is", "Hello"])
        print(json.dumps(seen))
        """,
        BASE=service.base,
    )
    alone = [
        httpx.post(
            service.base + "/v1/completions",
            json={"model": "tiny-gpt2", "prompt": p, "max_tokens": 8, "temperature": 0},
            timeout=30,
        ).json()["choices"][0]["text"]
        for p in ("The capital of France is", "Hello")
    ]
    assert seen == {"litellm": 400, "langchain": "OpenAIContextOverflowError", "batch": alone}
    assert alone[0].startswith(" Paris.")


def sse_data(raw: bytes) -> list[dict | str]:
    """The `data:` payloads of a raw /v1 stream, which must end its lines in LF."""
    assert b"\r" not in raw  # OpenAI's line ends, not sse-starlette's default CRLF
    lines = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_chat_chunks_are_shaped_as_openais(service):
    """A role chunk with empty content first, `usage: null` on every chunk until the
    usage chunk (include_usage), one system_fingerprint, LF line ends."""
    body = {"model": "tiny-gpt2", "messages": [{"role": "user", "content": "Hi"}]}
    body |= {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    streamed = httpx.post(
        service.base + "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        timeout=30,
    )
    *chunks, usage, done = sse_data(streamed.content)
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks)
    assert not any("role" in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    fingerprints = {c["system_fingerprint"] for c in [*chunks, usage]}
    whole = httpx.post(service.base + "/v1/chat/completions", json=body, timeout=30).json()
    assert fingerprints == {whole["system_fingerprint"]} and whole["system_fingerprint"]
    plain = httpx.post(
        service.base + "/v1/completions",
        json={"model": "tiny-gpt2", "prompt": "Hi", "max_tokens": 2, "stream": True},
        timeout=30,
    )
    assert all("usage" not in c for c in sse_data(plain.content)[:-1])  # not asked for


def test_a_list_of_prompts_gets_one_choice_each_streamed_or_not(client):
    prompts = [PROMPT, "Hello", PROMPT]
    args = {"model": "tiny-gpt2", "max_tokens": 8, "temperature": 0}
    alone = [client.completions.create(prompt=p, **args) for p in prompts]
    # New jobs, not the cached answers (the streamed list below reads those, the
    # same prompt twice sharing one job).
    whole = client.completions.create(prompt=prompts, extra_body={"use_cache": False}, **args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone]
    assert whole.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert whole.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    chunks = list(
        client.completions.create(
            prompt=prompts, stream=True, stream_options={"include_usage": True}, **args
        )
    )
    texts = ["", "", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    for prompt, why in (([[15496, 995]], "token-id"), ([15496], "token-id"), (["x"] * 33, "32")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(prompt=prompt, **args)
        assert caught.value.body["param"] == "prompt" and why in caught.value.body["message"]


def test_a_list_of_prompts_holds_a_stream_slot_each_and_leaves_nothing_when_refused(
    make_service,
):
    """One job and one stream slot per prompt: past MAX_STREAMS_PER_KEY the request
    is a 429 whose earlier jobs are stopped and slots given back. A job of a list
    that fails ends the stream with its error and stops the others."""
    key = {"Authorization": "Bearer key-one"}
    svc = make_service(model="fake:20", MAX_STREAMS_PER_KEY="2", API_KEYS="key-one")
    client = redis.Redis.from_url(svc.env["REDIS_URL"])
    body = {"model": "fake-20tps", "max_tokens": 300, "ignore_eos": True, "stream": True}
    refused = httpx.post(
        svc.base + "/v1/completions", json={**body, "prompt": ["a", "b", "c"]}, headers=key
    )
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    started = [k.decode().split(":")[3] for k in client.keys("textstream:job:*:events")]
    assert len(started) == 2  # the third was refused its slot
    for job in started:
        wait_for(lambda job=job: status(svc, key, job) == "cancelled", 10, "its job to stop")
    with httpx.stream(
        "POST", svc.base + "/v1/completions", json={**body, "prompt": ["a", "b"]}, headers=key
    ) as taken:  # the refused request's slots came back
        assert taken.status_code == 200
        ids = taken.headers["x-job-id"].split(", ")
        lines = taken.iter_lines()
        assert next(lines).startswith("data: ")
        httpx.delete(f"{svc.base}/jobs/{ids[0]}", headers=key)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "cancelled"
    wait_for(lambda: status(svc, key, ids[1]) == "cancelled", 10, "the other job to stop")
    # A client that leaves stops every job of its list.
    with httpx.stream(
        "POST", svc.base + "/v1/completions", json={**body, "prompt": ["a", "b"]}, headers=key
    ) as left:
        ids = left.headers["x-job-id"].split(", ")
        assert next(left.iter_lines()).startswith("data: ")
    for job_id in ids:
        wait_for(lambda job_id=job_id: status(svc, key, job_id) == "cancelled", 10, "jobs to stop")
    # Not streamed, a failed job is the answer (cancelled: 409), and stops the other.
    before = set(client.keys("textstream:job:*:events"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        whole = pool.submit(
            httpx.post,
            svc.base + "/v1/completions",
            json={**body, "stream": False, "prompt": ["a", "b"]},
            headers=key,
            timeout=30,
        )
        wait_for(lambda: len(set(client.keys("textstream:job:*:events")) - before) == 2, 10, "jobs")
        ids = [
            k.decode().split(":")[3] for k in set(client.keys("textstream:job:*:events")) - before
        ]
        httpx.delete(f"{svc.base}/jobs/{ids[0]}", headers=key)
        answer = whole.result()
    assert answer.status_code == 409 and answer.json()["error"]["code"] == "cancelled"
    wait_for(lambda: status(svc, key, ids[1]) == "cancelled", 10, "the other job to stop")


def status(svc, key, job_id: str) -> str:
    return httpx.get(f"{svc.base}/jobs/{job_id}", headers=key).json().get("status", "")


def spelt(tokens) -> str:
    return b"".join(bytes(t.bytes) for t in tokens).decode(errors="replace")


def test_chat_logprobs_streamed_and_not(client):
    """OpenAI's shape; greedy: each token is its own top-1, a logprob is <= 0, and
    the alternatives' probabilities sum to at most 1. Streamed chunks carry the
    logprobs of their own tokens."""
    kwargs = {
        "model": "tiny-gpt2",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    # The tiny model answers with emoji: a piece of a character is spelt U+FFFD,
    # its bytes kept in `bytes`.
    assert content and spelt(content) == whole.choices[0].message.content
    for token in content:
        assert token.logprob <= 0
        assert "\ufffd" in token.token or token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == token.logprob
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-6
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [
        t
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            assert spelt(chunk.choices[0].logprobs.content) == chunk.choices[0].delta.content
    plain = client.chat.completions.create(**{**kwargs, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == whole.choices[0].message.content


def test_completion_logprobs_in_the_legacy_shape(client):
    kwargs = {"model": "tiny-gpt2", "prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    whole = client.completions.create(**kwargs, logprobs=2)
    choice = whole.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 5
    assert all(value <= 0 for value in lp.token_logprobs)
    assert [max(top, key=top.get) for top in lp.top_logprobs] == lp.tokens
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(5)]
    chunks = [c for c in client.completions.create(**kwargs, logprobs=2, stream=True) if c.choices]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert tokens == lp.tokens and offsets == lp.text_offset


def test_chat_refuses_bad_top_logprobs_naming_it(client):
    messages = [{"role": "user", "content": "Hi"}]
    for value in (21, -1, "x"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="tiny-gpt2", messages=messages, logprobs=True, top_logprobs=value
            )
        assert caught.value.body["param"] == "top_logprobs", value
    with pytest.raises(openai.BadRequestError) as caught:  # without logprobs: true
        client.chat.completions.create(model="tiny-gpt2", messages=messages, top_logprobs=2)
    assert caught.value.body["param"] == "top_logprobs"


def test_n_choices_are_seeded_per_choice_and_summed(client):
    """n=3 with a seed: three choices (seed, seed+1, seed+2), the same three again
    for the same request; at temperature 1 they differ. Usage is summed."""
    kwargs = {
        "model": "tiny-gpt2",
        "prompt": "a b c",  # untrained: sampled at temperature 1, answers differ
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
        "n": 3,
        "extra_body": {"ignore_eos": True},
    }
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens == 24
    one = client.completions.create(**{**kwargs, "n": 1, "seed": 12})
    assert one.choices[0].text == texts[1]  # choice 1 is seed 12's answer
    chunks = list(client.completions.create(**kwargs, stream=True))
    streamed = ["", "", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts
    chat = client.chat.completions.create(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=1.0,
        n=2,
        logprobs=True,
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(len(c.logprobs.content) >= 1 for c in chat.choices)


def test_token_events_carry_logprobs_for_a_reader_that_resumes(service):
    """The worker publishes logprobs in the token events (with their ids): a
    reader resuming after Last-Event-ID gets them as the first reader did."""
    job_id = create(service.base, prompt=PROMPT, max_new_tokens=6, temperature=0, logprobs=2)
    events = read_some(service.base, job_id, 100)
    tokens = [e for e in events if e.event == "token"]
    assert events[-1].event == "done" and len(tokens) == 6
    for event in tokens:
        token, logprob, top = event.data["logprobs"][0]
        assert token == event.data["text"] and logprob <= 0 and top[0] == [token, logprob]
    resumed = read_some(service.base, job_id, 100, **{"Last-Event-ID": tokens[2].id})
    again = [e.data for e in resumed if e.event == "token"]
    assert again == [e.data for e in tokens[3:]]


def test_the_fake_engine_refuses_logprobs_rather_than_answering_without():
    engine = FakeEngine("fake:1000")
    with pytest.raises(LogprobsError):
        next(engine.generate([0], SamplingParams(max_new_tokens=2, logprobs=1)))
    assert JOB_ERROR_STATUS["invalid_logprobs"] == 400  # how the worker's error answers
