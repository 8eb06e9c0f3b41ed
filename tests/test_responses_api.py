"""OpenAI's Responses API (/v1/responses), driven by the official `openai` SDK (and
openai-agents), on two API processes sharing one Redis, with API keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import redis
from clients import run_client
from conftest import Service
from helpers import service_env, wait_for
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, Field, TypeAdapter

from bench.cluster import start_api
from textstream.api.conversations import StoredResponse
from textstream.api.response_events import ResponseEvents, fold
from textstream.transport.events import EventType, JobEvent

KEYS = {"API_KEYS": "key-one,key-two"}
MODEL = "tiny-gpt2"
GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0}
#: The SDK's event types, validated strictly (the SDK itself parses leniently).
SDK_EVENT = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def svc(
    redis_url: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, str]]:
    """One worker, two API processes: the second answers resumes and retrievals."""
    workdir = tmp_path_factory.mktemp("responses")
    service = Service(workdir, service_env(redis_url, str(tiny_model_dir), **KEYS), 1)
    second, base2 = start_api(service.env, workdir, name="api2")
    yield service, base2
    second.stop()
    service.stop()


def sdk(base: str, key: str = "key-one") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def one(svc: tuple[Service, str]) -> openai.OpenAI:
    return sdk(svc[0].base)


@pytest.fixture(scope="module")
def two(svc: tuple[Service, str]) -> openai.OpenAI:
    """The same key, on the second API process."""
    return sdk(svc[1])


def test_streamed_and_whole_responses_agree(one: openai.OpenAI) -> None:
    whole = one.responses.create(input="Hi", max_output_tokens=12, **GREEDY)
    assert whole.object == "response" and whole.id.startswith("resp_")
    assert whole.status in ("completed", "incomplete") and whole.model.endswith(MODEL)
    assert whole.usage is not None and whole.usage.total_tokens == (
        whole.usage.input_tokens + whole.usage.output_tokens
    )
    events = list(one.responses.create(input="Hi", max_output_tokens=12, stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    final = f"response.{whole.status}"
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    for event in events:
        SDK_EVENT.validate_python(event.to_dict())
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage == whole.usage


def test_stopping_at_max_output_tokens_is_incomplete(one: openai.OpenAI) -> None:
    response = one.responses.create(input="Hello", max_output_tokens=2, **GREEDY)
    assert response.status == "incomplete" and response.usage.output_tokens == 2
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


def test_input_items_and_instructions_are_the_chat_it_means(one: openai.OpenAI) -> None:
    items: list[Any] = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Where is Paris?"},
    ]
    response = one.responses.create(
        input=items, instructions="You are terse.", max_output_tokens=10, **GREEDY
    )
    messages: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Where is Paris?"},
    ]
    chat = one.chat.completions.create(messages=messages, max_tokens=10, **GREEDY)
    assert response.output_text == chat.choices[0].message.content
    assert response.instructions == "You are terse."


def test_unbuilt_features_are_refused_naming_them(one: openai.OpenAI) -> None:
    refused: list[tuple[str, dict[str, Any]]] = [
        ("tools", {"tools": [{"type": "web_search"}]}),
        ("tool_choice", {"tool_choice": "required"}),  # with no tools
        ("text", {"text": {"format": {"type": "xml"}}}),
        ("reasoning", {"reasoning": {"effort": "high"}}),
        ("include", {"include": ["message.output_text.logprobs"]}),
        ("top_logprobs", {"top_logprobs": 2}),
        ("background", {"background": True, "store": False}),
        ("input", {"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
        ("input", {"input": [{"type": "function_call_output", "output": "x"}]}),
    ]
    for param, fields in refused:
        body = {"input": "Hi", **GREEDY, **fields}
        with pytest.raises(openai.BadRequestError) as caught:
            one.post("/responses", body=body, cast_to=object)
        assert caught.value.body["param"] == param, param
    # What clients send by default (openai-agents: see test_openai_agents_...).
    harmless = {
        "tools": [],
        "include": [],
        "tool_choice": None,
        "parallel_tool_calls": False,
        "truncation": "disabled",
        "text": {"format": {"type": "text"}},
        "reasoning": {"effort": None, "summary": None},
        "metadata": {"k": "v"},
        "user": "u",
    }
    answer = one.post(
        "/responses",
        body={"input": "Hi", "max_output_tokens": 1, **GREEDY, **harmless},
        cast_to=object,
    )
    assert answer["status"] == "incomplete" and answer["metadata"] == {"k": "v"}


def test_background_response_resumes_on_another_process(
    one: openai.OpenAI, two: openai.OpenAI
) -> None:
    created = one.responses.create(
        input="The capital of France is", background=True, max_output_tokens=30, **GREEDY
    )
    assert created.status in ("queued", "in_progress") and created.background
    everything = list(two.responses.retrieve(created.id, stream=True))
    assert [e.sequence_number for e in everything] == list(range(len(everything)))
    assert everything[-1].type in ("response.completed", "response.incomplete")
    resumed = list(two.responses.retrieve(created.id, stream=True, starting_after=4))
    assert [e.model_dump() for e in resumed] == [e.model_dump() for e in everything[5:]]
    # Past the end of a finished response: the stream ends, empty.
    assert list(one.responses.retrieve(created.id, stream=True, starting_after=10**6)) == []
    final = two.responses.retrieve(created.id)
    Response.model_validate(final.to_dict())  # strictly, as the SDK does not
    assert final.output_text == everything[-1].response.output_text
    assert final.status == everything[-1].response.status
    with pytest.raises(openai.BadRequestError) as caught:
        list(two.responses.retrieve(created.id, stream=True, starting_after=-1))
    assert caught.value.body["param"] == "starting_after"


def test_cancel_stops_a_background_response_and_races_no_500(one: openai.OpenAI) -> None:
    # One worker: the second job waits behind the first, so its cancel is certain
    # to come first; the first's may race its end (either state is fine, no 500).
    long = {"input": "Hello", "background": True, "max_output_tokens": 1000, **GREEDY}
    first, second = one.responses.create(**long), one.responses.create(**long)
    cancelled = one.responses.cancel(second.id)
    assert cancelled.status == "cancelled"
    assert one.responses.retrieve(second.id).status == "cancelled"
    events = list(one.responses.retrieve(second.id, stream=True))
    assert events[-1].type == "response.failed" and events[-1].response.status == "cancelled"
    raced = one.responses.cancel(first.id)
    assert raced.status in ("cancelled", "completed", "incomplete")
    # Cancelling what already ended answers its final state.
    assert one.responses.cancel(first.id).status == raced.status
    foreground = one.responses.create(input="Hi", max_output_tokens=1, **GREEDY)
    with pytest.raises(openai.BadRequestError):
        one.responses.cancel(foreground.id)


def test_a_streamed_response_stops_when_its_client_leaves(make_service) -> None:
    # The fake engine: 1000 words at 20 a second, never an early end of text (the
    # tiny GPT-2 ends "Hello" after 31 tokens, which could beat the client's leaving).
    base = make_service(model="fake:20", **KEYS).base
    headers = {"Authorization": "Bearer key-one"}
    body = {"input": "Hello", "stream": True, "max_output_tokens": 1000}
    with httpx.stream("POST", f"{base}/v1/responses", json=body, headers=headers) as r:
        job_id = r.headers["X-Job-Id"]
        next(line for line in r.iter_lines() if line.startswith("data:"))  # created
    job = f"{base}/jobs/{job_id}"

    def status() -> str:
        return str(httpx.get(job, headers=headers).json()["status"])

    wait_for(lambda: status() != "running" and status() != "queued", 30, "the job to end")
    assert status() == "cancelled"


def test_previous_response_id_carries_the_conversation(one: openai.OpenAI) -> None:
    first = one.responses.create(input="Hi", instructions="Be kind.", max_output_tokens=6, **GREEDY)
    second = one.responses.create(
        input="And then?", previous_response_id=first.id, max_output_tokens=6, **GREEDY
    )
    messages: list[Any] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]  # the first's instructions are not carried over, as OpenAI's are not
    chat = one.chat.completions.create(messages=messages, max_tokens=6, **GREEDY)
    assert second.output_text == chat.choices[0].message.content
    assert second.previous_response_id == first.id
    unstored = one.responses.create(input="Hi", store=False, max_output_tokens=1, **GREEDY)
    with pytest.raises(openai.NotFoundError) as caught:
        one.responses.create(input="x", previous_response_id=unstored.id, **GREEDY)
    assert caught.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(unstored.id)


def test_another_keys_response_is_not_found(svc: tuple[Service, str], one: openai.OpenAI) -> None:
    mine = one.responses.create(input="Hi", background=True, max_output_tokens=2, **GREEDY)
    other = sdk(svc[1], key="key-two")
    for call in (
        lambda: other.responses.retrieve(mine.id),
        lambda: list(other.responses.retrieve(mine.id, stream=True)),
        lambda: other.responses.cancel(mine.id),
        lambda: other.responses.delete(mine.id),
        lambda: other.responses.create(input="x", previous_response_id=mine.id, **GREEDY),
        lambda: other.responses.retrieve("resp_" + "0" * 32),
        lambda: other.responses.retrieve("nonsense"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert one.responses.retrieve(mine.id).id == mine.id  # still there for its owner


def test_deleted_response_is_gone_with_its_output(
    svc: tuple[Service, str], one: openai.OpenAI
) -> None:
    response = one.responses.create(input="Hi", max_output_tokens=1, **GREEDY)
    one.responses.delete(response.id)
    job = httpx.get(
        f"{svc[0].base}/jobs/{response.id.removeprefix('resp_')}",
        headers={"Authorization": "Bearer key-one"},
    )
    assert job.status_code == 404
    with pytest.raises(openai.NotFoundError):
        one.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        one.responses.delete(response.id)


def test_everything_a_response_stores_expires(svc: tuple[Service, str], redis_url: str) -> None:
    """Background responses nobody reads leave nothing that lives forever."""
    base = svc[0].base
    headers = {"Authorization": "Bearer key-one"}
    body = {"input": "Hi", "background": True, "max_output_tokens": 1, **GREEDY}
    for _ in range(5):
        r = httpx.post(f"{base}/v1/responses", json=body, headers=headers, timeout=10)
        assert r.status_code == 200
    client = redis.Redis.from_url(redis_url)
    stored = list(client.scan_iter("textstream:response:*"))
    assert len(stored) >= 5
    assert all(0 < client.ttl(key) <= 3900 for key in stored)


def test_openai_agents_runs_on_responses(svc: tuple[Service, str], one: openai.OpenAI) -> None:
    expected = one.responses.create(
        input="Hi", instructions="Answer.", max_output_tokens=8, **GREEDY
    ).output_text
    script = f"""
        import asyncio, json
        from agents import Agent, ModelSettings, Runner
        from agents.models.openai_responses import OpenAIResponsesModel
        from openai import AsyncOpenAI

        async def main():
            client = AsyncOpenAI(base_url="{svc[0].base}/v1", api_key="key-one")
            agent = Agent(
                name="t",
                instructions="Answer.",
                model=OpenAIResponsesModel(model="{MODEL}", openai_client=client),
                model_settings=ModelSettings(temperature=0, max_tokens=8),
            )
            whole = await Runner.run(agent, "Hi")
            # A second turn sends the first's output items back as input.
            turn = whole.to_input_list() + [{{"role": "user", "content": "Hi"}}]
            again = await Runner.run(agent, turn)
            return [whole.final_output, again.final_output]

        print(json.dumps(asyncio.run(main())))
    """
    whole, again = run_client(script)
    assert whole == expected
    assert isinstance(again, str)


def job_events(*events: tuple[str, dict[str, Any]]) -> list[JobEvent]:
    return [JobEvent(f"1700000000000-{i}", name, data) for i, (name, data) in enumerate(events)]


THINKING = job_events(
    (EventType.QUEUED, {"job_id": "j"}),
    (EventType.STARTED, {}),
    (EventType.TOKEN, {"text": "<think>Paris is"}),
    (EventType.TOKEN, {"text": " in France.</think>\n\nThe"}),
    (EventType.TOKEN, {"text": " capital."}),
    (
        EventType.DONE,
        {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
    ),
)


def test_a_think_block_is_a_reasoning_item_before_the_message() -> None:
    events = ResponseEvents("f" * 32, StoredResponse(model=MODEL), split_thinking=True)
    sent = [e for job_event in THINKING for e in events.feed(job_event)]
    kinds = [e["type"] for e in sent]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    reasoning = [e["delta"] for e in sent if e["type"] == "response.reasoning_text.delta"]
    assert "".join(reasoning) == "Paris is in France."
    answer = [e["delta"] for e in sent if e["type"] == "response.output_text.delta"]
    assert "".join(answer) == "The capital."
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    for event in sent:
        SDK_EVENT.validate_python(event)
    final = sent[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [
        {"type": "reasoning_text", "text": "Paris is in France."}
    ]
    assert final["usage"]["total_tokens"] == 7 and final["status"] == "completed"
    # Derived again from the same events: the same events, numbered alike.
    again = ResponseEvents("f" * 32, StoredResponse(model=MODEL), split_thinking=True)
    assert [e for job_event in THINKING for e in again.feed(job_event)] == sent


def test_an_interrupted_read_is_an_error_event_and_a_failed_job_fails() -> None:
    lost = JobEvent("", EventType.ERROR, {"error": {"type": "redis_unavailable", "message": "m"}})
    events = fold("f" * 32, StoredResponse(model=MODEL), THINKING[:3], split=False)
    sent = events.sequence
    (error,) = events.feed(lost)
    assert error["type"] == "error" and error["code"] == "redis_unavailable"
    # Numbered as the last event sent: resuming after it loses nothing.
    assert error["sequence_number"] == sent - 1 and events.sequence == sent
    failed = JobEvent(
        "1700000000000-9", EventType.ERROR, {"error": {"type": "timeout", "message": "t"}}
    )
    (*closed, last) = events.feed(failed)
    assert [e["type"] for e in closed][-1] == "response.output_item.done"
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "server_error", "message": "t"}
    for event in [error, *closed, last]:
        SDK_EVENT.validate_python(event)


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}
]


def test_a_required_function_call_and_its_output_round_trip(one: openai.OpenAI) -> None:
    """tool_choice required constrains the tiny model to a valid call, streamed as
    OpenAI's function_call events; its output, sent back, gets a text answer."""
    ask = {"input": "Weather in Paris?", "tools": TOOLS, "max_output_tokens": 40, **GREEDY}
    whole = one.responses.create(**ask, tool_choice="required")
    assert whole.status == "completed" and [item.type for item in whole.output] == ["function_call"]
    call = whole.output[0]
    assert call.name == "get_weather" and call.status == "completed"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.arguments), WEATHER)  # type: ignore[union-attr]
    assert whole.tool_choice == "required" and whole.tools[0].name == "get_weather"

    events = list(one.responses.create(**ask, tool_choice="required", stream=True))
    for event in events:
        SDK_EVENT.validate_python(event.to_dict())
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1].response.output[0].arguments == call.arguments  # type: ignore[union-attr]
    assert events[2].item.arguments == "" and events[3].delta == call.arguments  # type: ignore[union-attr]

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}  # type: ignore[union-attr]
    after = one.responses.create(
        previous_response_id=whole.id, input=[result], tools=TOOLS, max_output_tokens=8, **GREEDY
    )
    assert after.output[-1].type == "message" and after.status in ("completed", "incomplete")
    # The same conversation sent back whole, as items, is the same chat.
    items: list[Any] = [{"role": "user", "content": "Weather in Paris?"}, call.model_dump(), result]
    again = one.responses.create(input=items, tools=TOOLS, max_output_tokens=8, **GREEDY)
    assert again.output_text == after.output_text


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=99)


def test_text_format_json_schema_is_constrained(one: openai.OpenAI) -> None:
    parsed = one.responses.parse(
        input="Describe a person.", text_format=Person, max_output_tokens=60, **GREEDY
    )
    assert parsed.status == "completed", parsed.output_text
    assert isinstance(parsed.output_parsed, Person)
    assert parsed.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_openai_agents_calls_a_function_tool(svc: tuple[Service, str]) -> None:
    script = f"""
        import asyncio, json
        from typing import Literal
        from agents import Agent, ModelSettings, Runner, function_tool
        from agents.models.openai_responses import OpenAIResponsesModel
        from openai import AsyncOpenAI

        seen = []

        @function_tool
        def get_weather(city: Literal["Paris", "Tokyo"]) -> str:
            \"\"\"The weather in a city.\"\"\"
            seen.append(city)
            return "sunny"

        async def main():
            client = AsyncOpenAI(base_url="{svc[0].base}/v1", api_key="key-one")
            agent = Agent(
                name="t",
                instructions="Use the tool.",
                tools=[get_weather],
                tool_use_behavior="stop_on_first_tool",
                model=OpenAIResponsesModel(model="{MODEL}", openai_client=client),
                model_settings=ModelSettings(
                    temperature=0,
                    max_tokens=40,
                    tool_choice="required",
                    parallel_tool_calls=False,
                ),
            )
            result = await Runner.run(agent, "Weather in Paris?")
            return [result.final_output, len(seen)]

        print(json.dumps(asyncio.run(main())))
    """
    final, calls = run_client(script)
    assert final == "sunny" and calls == 1


def test_an_auto_answer_is_its_text_then_its_calls_the_same_in_every_process() -> None:
    stored = StoredResponse(model=MODEL, tools=TOOLS, tool_choice="auto")
    called = job_events(
        (EventType.QUEUED, {"job_id": "j"}),
        (EventType.STARTED, {}),
        (EventType.TOKEN, {"text": "Let me look.<tool_"}),
        (EventType.TOKEN, {"text": 'call>{"name": "get_weather", "arguments": {"city": "Paris"}}'}),
        (EventType.TOKEN, {"text": "</tool_call>"}),
        (
            EventType.DONE,
            {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
        ),
    )
    sent = fold("f" * 32, stored, called, split=False)
    final = sent.snapshot()
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert sent.output_text == "Let me look."
    call = final["output"][1]
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["status"] == "completed"
    Response.model_validate(final)
    assert fold("f" * 32, stored, called, split=False).snapshot()["output"] == final["output"]


def test_a_named_tool_choice_forces_that_function_and_others_are_refused() -> None:
    from textstream.api.errors import InvalidInputError
    from textstream.api.responses_protocol import ResponsesRequest

    two = [*TOOLS, {"type": "function", "name": "other", "parameters": {"type": "object"}}]
    named = {"type": "function", "name": "get_weather"}
    tools, use, schema = ResponsesRequest(input="x", tools=two, tool_choice=named).tool_use()
    assert use is not None and use.constrained and tools and len(tools) == 2
    assert schema is not None and "other" not in schema  # only the named one
    for choice, param in (
        ({"type": "function", "name": "nope"}, "tool_choice"),
        (3, "tool_choice"),
    ):
        with pytest.raises(InvalidInputError) as caught:
            ResponsesRequest(input="x", tools=two, tool_choice=choice).tool_use()
        assert caught.value.field == param
    form = {"type": "json_schema", "name": "p", "schema": {"type": "object"}}
    with pytest.raises(InvalidInputError):  # a forced call and a text format: one or the other
        ResponsesRequest(
            input="x", tools=two, tool_choice="required", text={"format": form}
        ).tool_use()
