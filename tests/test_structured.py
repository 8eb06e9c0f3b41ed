"""Structured outputs: a completion with a schema always matches it, whatever the
model (here a tiny GPT-2 that knows nothing of JSON), and a schema that cannot be
compiled is refused before anything is queued."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field
from test_batching import load
from test_jobs import create, read_some

from textstream import keys
from textstream.api.cache import cache_key
from textstream.engines.transformers.engine import TransformersEngine
from textstream.grammars import canonical_schema
from textstream.job import CompletionJob, SamplingParams

PROMPT = "The capital of France is"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TransformersEngine:
    return load(tiny_model_dir, batching=True)


def generate(engine: TransformersEngine, params: SamplingParams) -> tuple[str, str | None]:
    steps = list(engine.generate(engine.encode_prompt(PROMPT), params))
    return engine.decode([s.token_id for s in steps]), steps[-1].finish_reason


# -- generated schemas ------------------------------------------------------------------

PATTERNS = ["^[a-z]{1,6}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no)$", "^[A-Z][a-z]{0,8}$"]

leaves = st.one_of(
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-1000, 1000),
        st.integers(0, 500),
    ),
    # A number's digits are bounded only by multipleOf (as a string's length by
    # maxLength): a random model would otherwise write digits up to max_tokens.
    st.builds(
        lambda lo, span, step: {
            "type": "number",
            "minimum": lo,
            "maximum": lo + span,
            "multipleOf": step,
        },
        st.floats(-100, 100, allow_nan=False).map(lambda x: round(x, 2)),
        st.floats(0.5, 50, allow_nan=False).map(lambda x: round(x, 2)),
        st.sampled_from([0.5, 0.25]),
    ),
    st.builds(
        lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
        st.integers(0, 3),
        st.integers(0, 8),
    ),
    st.sampled_from(PATTERNS).map(lambda p: {"type": "string", "pattern": p}),
    st.lists(
        st.sampled_from(["red", "green", "blue", 1, 2.5, None]), min_size=1, max_size=4, unique=True
    ).map(lambda values: {"enum": values}),
    st.just({"type": "boolean"}),
)


def containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    arrays = st.builds(
        lambda items, lo, extra: {
            "type": "array",
            "items": items,
            "minItems": lo,
            "maxItems": lo + extra,
        },
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )
    objects = st.dictionaries(
        st.sampled_from(["id", "name", "tags", "size", "kind"]), children, min_size=1, max_size=3
    ).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )
    either = st.lists(children, min_size=2, max_size=2).map(lambda options: {"anyOf": options})
    return st.one_of(arrays, objects, either)


#: Objects close (additionalProperties: false, as OpenAI's strict mode asks): an open
#: one lets a random model add properties until max_tokens.
schemas = st.recursive(leaves, containers, max_leaves=6).map(
    lambda schema: {
        "type": "object",
        "properties": {"answer": schema},
        "required": ["answer"],
        "additionalProperties": False,
    }
)


@hyp_settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_sampled_completions_match_generated_schemas(
    engine: TransformersEngine, schema: dict[str, Any], seed: int
) -> None:
    params = SamplingParams(
        max_new_tokens=400, temperature=1.0, seed=seed, json_schema=canonical_schema(schema)
    )
    text, finish = generate(engine, params)
    assert finish == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)


# -- the continuous batch ----------------------------------------------------------------


def test_constrained_row_leaves_its_batch_mate_unchanged(tiny_model_dir: Path) -> None:
    engine = load(tiny_model_dir, batching=True)
    plain = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    constrained = SamplingParams(
        max_new_tokens=60, temperature=0, json_schema=canonical_schema(PERSON)
    )
    solo, _ = generate(engine, plain)
    engine.grammars.matcher(constrained.json_schema or "")  # compiled before they meet
    engine.batcher.peak = 0  # type: ignore[union-attr]
    results: dict[str, tuple[str, str | None]] = {}
    threads = [
        threading.Thread(target=lambda k=k, p=p: results.__setitem__(k, generate(engine, p)))
        for k, p in (("plain", plain), ("constrained", constrained))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.batcher.peak == 2  # type: ignore[union-attr]  # they shared steps
    assert results["plain"] == (solo, "length")
    text, finish = results["constrained"]
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_max_tokens_cutting_the_json_short_finishes_with_length(engine) -> None:
    params = SamplingParams(max_new_tokens=3, temperature=0, json_schema=canonical_schema(PERSON))
    text, finish = generate(engine, params)
    assert finish == "length" and text.startswith("{")


def test_logprobs_under_a_schema_are_the_masked_distribution(engine) -> None:
    """A schema's mask is part of the distribution logprobs report: a forbidden
    token never appears with a usable probability, -inf is given as -9999 (JSON
    has no -inf), and the chosen token is among the allowed."""
    params = SamplingParams(
        max_new_tokens=12, temperature=0, json_schema=canonical_schema(PERSON), logprobs=5
    )
    steps = list(engine.generate(engine.encode_prompt(PROMPT), params))
    for step in steps:
        assert step.logprobs is not None
        chosen, top = step.logprobs
        assert top[0] == (step.token_id, chosen) and chosen > -9999
        assert all(-9999 <= lp <= 0 for _, lp in top)
    assert engine.decode([s.token_id for s in steps]).startswith("{")


def test_the_schema_is_part_of_the_cache_key() -> None:
    def key(schema: str | None) -> str:
        params = SamplingParams(json_schema=schema)
        return cache_key(CompletionJob(job_id="j", prompt=PROMPT, params=params))

    assert len({key(None), key('{"type":"object"}'), key(canonical_schema(PERSON))}) == 3


def test_logprobs_are_part_of_the_cache_key_and_absent_ones_change_no_key() -> None:
    def key(**params: Any) -> str:
        return cache_key(CompletionJob(job_id="j", prompt=PROMPT, params=SamplingParams(**params)))

    assert len({key(), key(logprobs=0), key(logprobs=3)}) == 3
    # A key as it was before logprobs existed: the field is left out when unset.
    identity = {
        "tenant": "",
        "model": "",
        "prompt": PROMPT,
        "messages": None,
        "continue_final": False,
        "prompt_format": "auto",
        "params": {
            k: v for k, v in SamplingParams().model_dump(mode="json").items() if k != "logprobs"
        },
    }
    encoded = json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()
    assert key() == keys.cache_entry(hashlib.sha256(encoded).hexdigest())


# -- the API -----------------------------------------------------------------------------


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.base}/v1", api_key="unused", max_retries=0)


def test_chat_parse_returns_the_pydantic_model(client) -> None:
    result = client.chat.completions.parse(
        model="tiny-gpt2",
        messages=[{"role": "user", "content": PROMPT}],
        response_format=Person,
        max_tokens=100,
        temperature=0,
    )
    choice = result.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


def test_completions_json_object_constrains_the_answer_to_an_object(client) -> None:
    """The tiny model, free, answers " Paris. ..."; held to an object, it writes a
    key it never closes (any text may be a key) until max_tokens: `length`, as
    OpenAI's. (Closed schemas that do end: the property test above.)"""
    result = client.completions.create(
        model="tiny-gpt2",
        prompt=PROMPT,
        max_tokens=30,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    choice = result.choices[0]
    assert choice.text.startswith('{"') and choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 30


def test_native_routes_take_a_json_schema(service) -> None:
    answer = httpx.get(
        f"{service.base}/completion/{PROMPT}",
        params={"stream": "false", "max_new_tokens": 60, "json_schema": json.dumps(PERSON)},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    jsonschema.validate(json.loads(answer.json()["text"]), PERSON)
    created = httpx.post(
        f"{service.base}/jobs", json={"prompt": PROMPT, "json_schema": PERSON}, timeout=10
    )
    assert created.status_code == 202, created.text


DEEP: dict[str, Any] = {"type": "string"}
for _ in range(100):
    DEEP = {"type": "array", "items": DEEP}


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"enum": [f"v{i}" for i in range(20_000)]}}},
        DEEP,
        {"type": "strin"},
        {"allOf": [{"type": "integer"}, {"type": "string"}]},
        {"$ref": "#/nowhere"},
    ],
    ids=["huge-enum", "deep", "bad-type", "unsatisfiable", "bad-ref"],
)
def test_a_schema_that_cannot_be_compiled_is_refused_quickly(service, schema) -> None:
    body = {
        "model": "tiny-gpt2",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    started = time.monotonic()
    response = httpx.post(f"{service.base}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "response_format"
    assert time.monotonic() - started < 3


def test_the_fake_engine_refuses_a_schema_with_an_error_event(make_service) -> None:
    svc = make_service(model="fake:200")
    job = create(svc.base, prompt=PROMPT, json_schema=PERSON)
    events = read_some(svc.base, job, tokens=1)
    assert events[-1].event == "error"
    assert events[-1].data["error"]["type"] == "invalid_response_format"
    assert not any(e.event == "token" for e in events)
    # Not streamed, the schema the engine cannot keep is the caller's bad input: a
    # 400 the openai SDK raises as BadRequestError, not a 502.
    client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="fake-200tps",
            messages=[{"role": "user", "content": PROMPT}],
            response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
        )
    assert refused.value.code == "invalid_response_format"
