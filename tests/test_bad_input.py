"""Bad input gets a clear 4xx naming the field, changes nothing, and never a 5xx."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import httpx
import pytest
from helpers import queued, stream, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_PROMPT_CHARS = 8000  # the default, which the test service runs with
#: The longest prompt worth tokenizing once the tiny model's window (1,024) is
#: known: 16 characters a token (submit.CHARS_PER_TOKEN).
PROMPT_CHAR_LIMIT = 16 * 1024

BAD_JOBS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   \n\t "}, "prompt"),
    ({"prompt": "x" * (PROMPT_CHAR_LIMIT + 1)}, "prompt"),
    ({"prompt": "bell \x07 inside"}, "prompt"),
    ({"prompt": "nul \x00 inside"}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": -5}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 10**6}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 2.5}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": -1}, "top_k"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "prompt_format": "yaml"}, "prompt_format"),
    ({"prompt": "hi", "max_token": 5}, "max_token"),  # a typo is refused, not ignored
    ({"prompt": "hi", "top_k": 2**70}, "top_k"),  # would reach an upstream engine as is
    ({"prompt": "hi", "model": ""}, "model"),  # no name is not the default model
    ({"prompt": "hi", "model": "m" * 10_000}, "model"),
    ({"prompt": "hi", "stop": ["a"] * 5}, "stop"),
    # A lone surrogate in a field no model reads (a message's `name`), or in a key.
    ({"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "x", "\ud800": 1}]}, "messages.0"),
]


@pytest.mark.parametrize("body,field", BAD_JOBS, ids=[f for _, f in BAD_JOBS])
def test_bad_job_bodies_get_422_naming_the_field(service, redis_client, body, field):
    before = queued(redis_client)
    # json.dumps escapes a lone surrogate (\ud800), which UTF-8 cannot carry raw.
    content, headers = json.dumps(body), {"content-type": "application/json"}
    response = httpx.post(service.base + "/jobs", content=content, headers=headers, timeout=10)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["field"] == field and error["message"]
    assert queued(redis_client) == before


@pytest.mark.parametrize(
    "content", [b"{not json", b"", b"[1, 2]", b'"just a string"', b'{"prompt": "hi",}']
)
def test_malformed_json_gets_422(service, content):
    response = httpx.post(
        service.base + "/jobs", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize(
    "content,content_type,status",
    [
        ('{"prompt": "hi"}'.encode("utf-16"), "application/json", 422),  # BOM: not UTF-8
        ('{"prompt": "hi"}'.encode("utf-16-le"), "application/json", 422),  # NULs
        ('{"prompt": "hi"}'.encode("utf-32"), "application/json", 422),
        (b'{"prompt": "hi"}', None, 415),  # a cross-site no-cors fetch sends no type
        (b'{"prompt": "caf\xe9"}', "application/json", 422),  # Latin-1
        (b'{"prompt": "hi"}', "text/plain", 415),
        (b"prompt=hi", "application/x-www-form-urlencoded", 415),  # curl -d without -H
        (b'{"prompt": "hi"}', "application/json; charset=latin-1", 415),
    ],
)
def test_a_body_not_json_in_utf8_is_refused_and_queues_nothing(
    service, redis_client, content, content_type, status
):
    before = queued(redis_client)
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(service.base + "/jobs", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    assert queued(redis_client) == before


def test_json_in_utf8_is_taken_with_a_json_content_type(service):
    for headers in (
        {"content-type": "application/json; charset=UTF-8"},
        {"content-type": "application/vnd.api+json"},
    ):
        body = '{"prompt": "café", "max_new_tokens": 1}'.encode()
        response = httpx.post(service.base + "/jobs", content=body, headers=headers)
        assert response.status_code == 202, response.text


def test_query_values_not_utf8_are_refused_naming_them(service, redis_client):
    before = queued(redis_client)
    for query, field in [("stop=%FF", "stop"), ("model=%ED%A0%80", "model"), ("%FF=1", "query")]:
        response = httpx.get(f"{service.base}/completion/hi?max_new_tokens=1&{query}")
        assert response.status_code == 422, (query, response.text)
        assert response.json()["error"]["field"] == field
    assert queued(redis_client) == before
    # A real U+FFFD, correctly encoded, is text like any other.
    response = stream(service.base, "/completion/%EF%BF%BD", max_new_tokens=1)
    assert response.status == 200 and response.last.event == "done"


def test_a_last_event_id_with_leading_zeros_names_the_same_event(service):
    job = httpx.post(service.base + "/jobs", json={"prompt": "hi", "max_new_tokens": 3}).json()
    url = f"/jobs/{job['id']}/events"
    events = stream(service.base, url).events
    first = events[0].id
    ms, seq = first.split("-")
    for padded in (f"0{ms}-{seq}", f"{ms}-00{seq}"):
        rest = stream(service.base, url, last_event_id=padded).events
        assert [e.id for e in rest] == [e.id for e in events[1:]], padded


def test_a_last_event_id_must_be_one_of_the_jobs_events(service):
    """An id from another job, or one made up between two real ones, would skip
    events silently: 400, naming it."""
    jobs = [
        httpx.post(service.base + "/jobs", json={"prompt": p, "max_new_tokens": 3}).json()["id"]
        for p in ("one", "two")
    ]
    first, second = (stream(service.base, f"/jobs/{j}/events").events for j in jobs)
    ms, _ = first[1].id.split("-")
    for foreign in (second[0].id, f"{ms}-7", f"{int(ms) + 1}-0"):
        answer = httpx.get(
            f"{service.base}/jobs/{jobs[0]}/events", params={"last_event_id": foreign}, timeout=5
        )
        if foreign in {e.id for e in first}:
            continue  # made up, but happens to be real
        assert answer.status_code == 400, foreign
        assert answer.json()["error"]["field"] == "last_event_id"
    whole = stream(service.base, f"/jobs/{jobs[0]}/events", last_event_id="0-0").events
    assert [e.id for e in whole] == [e.id for e in first]


def test_nan_and_infinity_are_refused(service):
    for value in ("NaN", "Infinity"):
        content = f'{{"prompt": "hi", "temperature": {value}}}'.encode()
        response = httpx.post(
            service.base + "/jobs", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
    response = httpx.get(service.base + "/completion/hi", params={"temperature": "nan"})
    assert response.status_code == 422 and response.json()["error"]["field"] == "temperature"


@pytest.mark.parametrize(
    "path,field",
    [
        ("/completion/%FF%FE", "question"),  # not UTF-8
        ("/completion/caf%C3", "question"),  # truncated UTF-8
        ("/completion/a%00b", "question"),  # control characters
        ("/completion/line%0Abreak%1B", "question"),
        ("/completion/%20", "question"),
        # httpx resolves the dot segment: the request is GET /completion.
        ("/completion/.", "question"),
        ("/completion/", "question"),
    ],
)
def test_bad_paths_get_422(service, path, field):
    response = httpx.get(service.base + path, timeout=10)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


IMPOSSIBLE_EVENT_IDS = [
    "yesterday",
    "1-2-3",
    "-1",
    "99999999999999999999-0",  # 20 digits, past 2**64
    "18446744073709551616-0",  # 2**64
    "\u0661\u0662-0",  # Arabic-Indic digits: Python's \d matches them, Redis does not
    "1-1\n",
    "4102444800000-0",  # the year 2100: after any event the job has
]


@pytest.mark.parametrize("bad", IMPOSSIBLE_EVENT_IDS)
def test_impossible_last_event_id_gets_400_at_once_naming_it(service, bad):
    job = httpx.post(service.base + "/jobs", json={"prompt": "hi", "max_new_tokens": 2}).json()
    url = f"{service.base}/jobs/{job['id']}/events"
    if "\n" not in bad:  # a header cannot carry a newline; the query string can
        started = time.monotonic()
        header = {"Last-Event-ID": bad.encode()}  # raw UTF-8 bytes
        response = httpx.get(url, headers=header, timeout=5)
        assert time.monotonic() - started < 2
        assert response.status_code == 400
        assert response.json()["error"]["field"] == "Last-Event-ID"
    response = httpx.get(url, params={"last_event_id": bad}, timeout=5)
    assert response.status_code == 400 and response.json()["error"]["field"] == "last_event_id"


def test_prompt_longer_than_the_context_window_is_refused_as_clients_know_it(service):
    prompt = "word " * 1100  # ~1100 GPT-2 tokens; the tiny model's window is 1024
    assert len(prompt) < MAX_PROMPT_CHARS

    def refused() -> bool:
        response = httpx.post(service.base + "/jobs", json={"prompt": prompt}, timeout=10)
        return response.status_code == 422

    # The API loads the served model's tokenizer in the background once it sees a worker.
    wait_for(refused, 30, "the API to check prompt length")
    body = httpx.post(service.base + "/jobs", json={"prompt": prompt}, timeout=10).json()
    assert body["error"]["field"] == "prompt" and body["error"]["type"] == "context_length_exceeded"
    # OpenAI's words, which clients match (litellm: "maximum context length is").
    assert body["error"]["message"].startswith(
        "This model's maximum context length is 1024 tokens. However, your prompt resulted in"
    )
    response = httpx.get(f"{service.base}/completion/{prompt}", timeout=10)
    assert response.status_code == 422 and response.json()["error"]["field"] == "question"
    assert response.json()["error"]["type"] == "context_length_exceeded"
    completion = httpx.post(
        service.base + "/v1/completions",
        json={"model": "tiny-gpt2", "prompt": prompt, "max_tokens": 2},
        timeout=10,
    )
    error = completion.json()["error"]
    assert completion.status_code == 400 and error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error" and error["param"] == "prompt"
    # A chat names the field it was sent in, natively and under /v1.
    messages = [{"role": "user", "content": prompt}]
    native = httpx.post(service.base + "/jobs", json={"messages": messages}, timeout=10)
    assert native.status_code == 422 and native.json()["error"]["field"] == "messages"
    chat = httpx.post(
        service.base + "/v1/chat/completions",
        json={"model": "tiny-gpt2", "messages": messages, "max_tokens": 2},
        timeout=10,
    )
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages", chat.text
    assert chat.json()["error"]["code"] == "context_length_exceeded"
    assert "1024 tokens. However, your messages resulted in" in chat.json()["error"]["message"]
    # Just under the window is accepted; generation then stops at the window.
    fits = stream(service.base, "/completion/" + "word " * 1000, max_new_tokens=50, ignore_eos=True)
    assert fits.last.event == "done" and fits.last.data["finish_reason"] == "length"
    assert (
        fits.last.data["usage"]["prompt_tokens"] + fits.last.data["usage"]["completion_tokens"]
        == 1024
    )


def test_tokens_not_characters_decide_whether_a_prompt_fits(service):
    """MAX_PROMPT_CHARS (8,000 here) only guards the tokenizer: once the window is
    known, a prompt of up to 16 characters a token of it is tokenized, and one that
    fits is taken; one past that is refused for its characters, saying the limit."""
    rules = ("=" * 64 + "\n") * 140  # 9,100 characters, a few hundred GPT-2 tokens
    assert MAX_PROMPT_CHARS < len(rules) < PROMPT_CHAR_LIMIT

    def taken() -> bool:
        body = {"model": "tiny-gpt2", "prompt": rules, "max_tokens": 1}
        return httpx.post(service.base + "/v1/completions", json=body, timeout=30).is_success

    wait_for(taken, 30, "the API to learn the model's context window")
    body = {"prompt": rules, "max_new_tokens": 1}
    native = httpx.post(service.base + "/jobs", json=body, timeout=10)
    assert native.status_code == 202, native.text
    abusive = httpx.post(
        service.base + "/jobs", json={"prompt": "x" * (PROMPT_CHAR_LIMIT + 1)}, timeout=10
    )
    error = abusive.json()["error"]
    assert abusive.status_code == 422 and error["type"] == "invalid_request"
    assert error["field"] == "prompt" and f"the limit is {PROMPT_CHAR_LIMIT}" in error["message"]


# --- fuzzing: whatever arrives, the answer is never a 5xx -----------------------------

FIELDS = [
    "prompt",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "ignore_eos",
    "prompt_format",
    "stream",
    "n",
    "",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), VALUES, max_size=6),
    st.fixed_dictionaries({"prompt": st.text(max_size=50)}, optional={"max_new_tokens": VALUES}),
    VALUES,
)
QUERIES = st.dictionaries(
    st.sampled_from(FIELDS), st.text(max_size=12) | st.integers().map(str), max_size=5
)
FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def idle_api(make_service):
    """An API with no workers and a full queue: every valid request meets a 429, so
    none waits for a worker that never comes (a cancelled job leaves the queue, so
    the fuzzer's own requests would not keep it full)."""
    svc = make_service(workers=0, MAX_QUEUED_JOBS="5", MAX_QUEUED_PER_CALLER="5")
    for _ in range(5):
        assert httpx.post(svc.base + "/jobs", json={"prompt": "hold"}).status_code == 202
    return svc


@FUZZ
@given(body=BODIES)
def test_fuzzed_job_bodies_never_get_a_5xx(idle_api, body):
    response = httpx.post(idle_api.base + "/jobs", json=body, timeout=10)
    assert response.status_code in (202, 422, 429), (body, response.text)
    assert response.headers["content-type"].startswith("application/json")


@FUZZ
@given(question=st.text(min_size=1, max_size=40), query=QUERIES)
def test_fuzzed_completion_requests_never_get_a_5xx(idle_api, question, query):
    path = "/completion/" + quote(question, safe="")
    with httpx.stream("GET", idle_api.base + path, params=query, timeout=10) as response:
        assert response.status_code in (200, 404, 422, 429), (question, query)


@FUZZ
@given(raw=st.binary(min_size=1, max_size=20))
def test_fuzzed_raw_path_bytes_never_get_a_5xx(idle_api, raw):
    path = "/completion/" + "".join(f"%{b:02X}" for b in raw)
    with httpx.stream("GET", idle_api.base + path, timeout=10) as response:
        assert response.status_code in (200, 422, 429)


def test_the_body_limit_grows_to_hold_the_longest_prompt_taken():
    """MAX_BODY_BYTES must not refuse a prompt the character limit takes (one of a
    long-window model): the limit is at least 6 bytes (a \\uXXXX escape) a character."""
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from textstream.api.limits import BodyLimit

    async def app(scope, receive, send):
        await PlainTextResponse("taken")(scope, receive, send)

    chars = [0]
    client = TestClient(BodyLimit(app, max_bytes=1024, prompt_chars=lambda: chars[0]))
    body = json.dumps({"prompt": "é" * 20_000})  # 120,014 bytes: ASCII JSON, escaped
    headers = {"content-type": "application/json"}
    assert client.post("/jobs", content=body, headers=headers).status_code == 413
    chars[0] = 20_000  # a window served now takes 20,000-character prompts
    assert client.post("/jobs", content=body, headers=headers).text == "taken"
    limit = 6 * 20_000 + 65_536  # and 64 KiB for the rest of the body
    refused = client.post("/jobs", content=" " * (limit + 1), headers=headers)
    assert refused.status_code == 413 and f"{limit}-byte limit" in refused.text
