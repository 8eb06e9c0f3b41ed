"""Issue 26's client matrix: the structured-output and tool features of the
third-party clients people point at an OpenAI-compatible server, each driven end
to end against the real service (one worker on the tiny GPT-2), in the clients'
own venv (tests/clients.py): langchain-openai, pydantic-ai, instructor and the
`llm` CLI. (The openai SDK's `chat.completions.parse`: test_structured.py;
langchain's named `bind_tools`: test_tools.py; openai-agents and litellm:
test_responses_api.py and test_openai.py.)

Constrained decoding makes even a 2-layer model answer with valid output, on
two conditions that are the model's, not the service's (README, structured
outputs): strings are bounded (`maxLength`) and objects closed
(`additionalProperties: false`, pydantic's `extra="forbid"`), else the model
may write one string, or one key after another, until `max_tokens`. Where a
client's own schema is open (the `llm` CLI's concise `--schema 'name, age int'`,
instructor's JSON mode, which sends `json_object` and the schema only as
instructions), the test checks that the service applied what it was sent and
cut the answer with `length`, as OpenAI does.

Each script prints what it got and the request bodies the service was sent (an
httpx hook on the client's transport), checked here. One subprocess per client:
importing them takes seconds."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import jsonschema
from clients import run_client

MODEL = "tiny-gpt2"

#: The schema of the scripts' Person, as the service must enforce it.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
}
WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}},
    "required": ["city"],
}

#: What every script starts with: the service's URL, a closed Person with bounded
#: fields, and `record` (an httpx request hook) collecting the bodies it sends.
PREAMBLE = """
import asyncio, json, os
import httpx
from pydantic import BaseModel, ConfigDict, Field

BASE = os.environ["BASE"] + "/v1"
MODEL = os.environ["MODEL"]
sent = []

def record(request):
    sent.append(json.loads(request.content) if request.content else None)

async def arecord(request):
    record(request)

def taken():
    '''The bodies sent since the last call.'''
    bodies = sent[:]
    sent.clear()
    return bodies

class Person(BaseModel):
    '''A person.'''
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=150)
"""


def run(service: Any, script: str) -> Any:
    code = textwrap.dedent(PREAMBLE) + textwrap.dedent(script)
    return run_client(code, BASE=service.base, MODEL=MODEL)


def valid_person(value: Any) -> None:
    jsonschema.validate(value, {**PERSON, "additionalProperties": False})


def schema_of(body: dict[str, Any]) -> dict[str, Any]:
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema"
    return fmt["json_schema"]["schema"]


def test_langchain_structured_output_and_a_tool_round_trip(service) -> None:
    got = run(
        service,
        """
        from langchain_core.messages import HumanMessage
        from langchain_core.tools import tool
        from langchain_openai import ChatOpenAI

        model = ChatOpenAI(
            base_url=BASE, api_key="unused", model=MODEL, temperature=0, max_tokens=100,
            max_retries=0, http_client=httpx.Client(event_hooks={"request": [record]}),
        )
        out = {}
        for method in ("json_schema", "function_calling"):
            structured = model.with_structured_output(Person, method=method, include_raw=True)
            reply = structured.invoke("Who is Ada?")
            assert reply["parsing_error"] is None, reply["parsing_error"]
            assert isinstance(reply["parsed"], Person)
            out[method] = {
                "parsed": reply["parsed"].model_dump(),
                "finish": reply["raw"].response_metadata["finish_reason"],
                "sent": taken(),
            }

        class Weather(BaseModel):
            city: str = Field(max_length=10)

        @tool(args_schema=Weather)
        def get_weather(city: str) -> str:
            '''The weather in a city.'''
            return f"sunny in {city}"

        # A round trip: a required call, its result back, then an answer (auto:
        # the tiny model writes no call of its own).
        messages = [HumanMessage("Weather in Paris?")]
        call = model.bind_tools([get_weather], tool_choice="required").invoke(messages)
        messages += [call, *(get_weather.invoke(c) for c in call.tool_calls)]
        final = model.bind_tools([get_weather]).invoke(messages)
        out["round_trip"] = {
            "calls": call.tool_calls,
            "call_finish": call.response_metadata["finish_reason"],
            "results": [m.content for m in messages[2:]],
            "final": final.content,
            "final_calls": final.tool_calls,
            "final_finish": final.response_metadata["finish_reason"],
            "sent": taken(),
        }
        # The same call streamed: its chunks add up to the call.
        chunks = list(model.bind_tools([get_weather], tool_choice="get_weather").stream("Rome?"))
        whole = chunks[0]
        for chunk in chunks[1:]:
            whole += chunk
        out["streamed"] = {"calls": whole.tool_calls, "chunks": len(chunks), "sent": taken()}
        print(json.dumps(out))
        """,
    )
    # json_schema: the schema as response_format, the answer parsed from the text.
    # One request each: a retry would hide an error.
    native = got["json_schema"]
    [sent] = native["sent"]
    assert schema_of(sent)["properties"]["name"]["maxLength"] == 8
    assert "tools" not in sent
    assert native["finish"] == "stop"
    valid_person(native["parsed"])
    # function_calling: a forced call of a function named after the model.
    forced = got["function_calling"]
    [sent] = forced["sent"]
    assert sent["tool_choice"]["function"]["name"] == "Person"
    assert "response_format" not in sent
    assert forced["finish"] == "tool_calls"
    valid_person(forced["parsed"])

    trip = got["round_trip"]
    assert trip["call_finish"] == "tool_calls" and trip["calls"]
    for call in trip["calls"]:
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(call["args"], WEATHER_ARGS)
    assert trip["results"] == [f"sunny in {c['args']['city']}" for c in trip["calls"]]
    asked, answered = trip["sent"]
    assert asked["tool_choice"] == "required"
    # The second request carried the call and its result, matched by id ...
    assistant, *results = answered["messages"][1:]
    assert [c["id"] for c in assistant["tool_calls"]] == [c["id"] for c in trip["calls"]]
    assert [(r["role"], r["tool_call_id"]) for r in results] == [
        ("tool", c["id"]) for c in trip["calls"]
    ]
    # ... and was answered with text.
    assert trip["final"] and not trip["final_calls"]
    assert trip["final_finish"] in ("stop", "length")

    streamed = got["streamed"]
    [sent] = streamed["sent"]
    assert sent["stream"] is True and streamed["chunks"] > 1 and len(streamed["calls"]) == 1
    assert streamed["calls"][0]["name"] == "get_weather"
    assert streamed["calls"][0]["id"].startswith("call_")
    jsonschema.validate(streamed["calls"][0]["args"], WEATHER_ARGS)


def test_pydantic_ai_agents_output_a_model_and_call_a_tool(service) -> None:
    """Tool output (pydantic-ai's default: an output tool it requires), native
    output (response_format), a streamed run, and a function tool round trip.
    The tiny model never chooses to stop calling tools, so the tool agent's
    settings say per step what may be called: the tool by name until its result
    is in, then only the output tool (pydantic-ai's `tool_choice`, as a real agent
    would narrow it)."""
    got = run(
        service,
        """
        from typing import Annotated
        from pydantic_ai import Agent, RunContext
        from pydantic_ai.messages import ToolReturnPart
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.output import NativeOutput
        from pydantic_ai.providers.openai import OpenAIProvider

        provider = OpenAIProvider(
            base_url=BASE, api_key="unused",
            http_client=httpx.AsyncClient(event_hooks={"request": [arecord]}, timeout=60),
        )
        model = OpenAIChatModel(MODEL, provider=provider)
        settings = {"temperature": 0, "max_tokens": 100}

        def step(ctx: RunContext) -> dict:
            called = any(
                isinstance(part, ToolReturnPart)
                for message in ctx.messages
                for part in getattr(message, "parts", [])
            )
            return {**settings, "tool_choice": "none" if called else ["get_weather"]}

        tool_agent = Agent(model, output_type=Person, model_settings=step)
        results = []

        @tool_agent.tool_plain
        def get_weather(city: Annotated[str, Field(max_length=10)]) -> str:
            '''The weather in a city.'''
            results.append(city)
            return f"sunny in {city}"

        async def main():  # one event loop: the http client's connections belong to it
            out = {}
            result = await Agent(model, output_type=Person, model_settings=settings).run("Ada?")
            assert isinstance(result.output, Person)
            out["tool_output"] = {"output": result.output.model_dump(), "sent": taken()}

            native = Agent(model, output_type=NativeOutput(Person), model_settings=settings)
            result = await native.run("Ada?")
            assert isinstance(result.output, Person)
            out["native"] = {"output": result.output.model_dump(), "sent": taken()}

            agent = Agent(model, output_type=Person, model_settings=settings)
            async with agent.run_stream("Ada?") as run:
                outputs = [p.model_dump() async for p in run.stream_output(debounce_by=None)]
            out["streamed"] = {"outputs": outputs, "sent": taken()}

            result = await tool_agent.run("Weather in Paris?")
            assert isinstance(result.output, Person)
            out["tool"] = {
                "output": result.output.model_dump(),
                "results": results,
                "messages": json.loads(result.all_messages_json()),
                "sent": taken(),
            }
            return out

        out = asyncio.run(main())
        print(json.dumps(out))
        """,
    )
    # One request each: a retry would hide an error.
    tool_output = got["tool_output"]
    valid_person(tool_output["output"])
    [sent] = tool_output["sent"]
    assert sent["tool_choice"] == "required"
    assert [t["function"]["name"] for t in sent["tools"]] == ["final_result"]

    native = got["native"]
    valid_person(native["output"])
    [sent] = native["sent"]
    assert schema_of(sent)["properties"]["age"]["maximum"] == 150
    assert "tools" not in sent

    streamed = got["streamed"]
    [sent] = streamed["sent"]
    assert sent["stream"] is True and streamed["outputs"]
    valid_person(streamed["outputs"][-1])

    tool = got["tool"]
    valid_person(tool["output"])
    assert len(tool["results"]) == 1 and len(tool["results"][0]) <= 10
    asked, answered = tool["sent"]  # one call, one answer: no loop
    assert asked["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert answered["tool_choice"] == {"type": "function", "function": {"name": "final_result"}}
    call = answered["messages"][1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": tool["results"][0]}
    assert answered["messages"][2] == {
        "role": "tool",
        "tool_call_id": call["id"],
        "content": f"sunny in {tool['results'][0]}",
    }
    kinds = [part["part_kind"] for m in tool["messages"] for part in m["parts"]]
    assert kinds == ["user-prompt", "tool-call", "tool-return", "tool-call", "tool-return"]


def test_instructor_modes_create_a_pydantic_model(service) -> None:
    """TOOLS (a named call), JSON_SCHEMA (response_format), a nested model (whose
    $defs a forced call's schema once lost: a 400), and JSON mode."""
    got = run(
        service,
        """
        import instructor
        from instructor.core.exceptions import IncompleteOutputException
        from openai import OpenAI

        client = OpenAI(
            base_url=BASE, api_key="unused", max_retries=0,
            http_client=httpx.Client(event_hooks={"request": [record]}, timeout=60),
        )
        ask = dict(
            model=MODEL, messages=[{"role": "user", "content": "Who is Ada?"}],
            max_tokens=100, temperature=0, max_retries=0,
        )
        out = {}
        for mode in ("TOOLS", "JSON_SCHEMA"):
            patched = instructor.from_openai(client, mode=getattr(instructor.Mode, mode))
            person = patched.chat.completions.create(response_model=Person, **ask)
            assert isinstance(person, Person)
            out[mode] = {"output": person.model_dump(), "sent": taken()}
        # A nested model: the tool's parameters reference their own $defs.
        class Team(BaseModel):
            model_config = ConfigDict(extra="forbid")
            lead: Person
            members: list[Person] = Field(max_length=2)

        patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
        team = patched.chat.completions.create(response_model=Team, **ask)
        assert isinstance(team, Team)
        out["nested"] = {"output": team.model_dump(), "sent": taken()}
        # JSON mode: json_object, the schema only in a system message.
        patched = instructor.from_openai(client, mode=instructor.Mode.JSON)
        try:
            patched.chat.completions.create(response_model=Person, **{**ask, "max_tokens": 20})
            out["JSON"] = {"error": None}
        except IncompleteOutputException as exc:
            out["JSON"] = {"error": type(exc).__name__, "sent": taken()}
            out["JSON"]["text"] = exc.last_completion.choices[0].message.content
        print(json.dumps(out))
        """,
    )
    tools = got["TOOLS"]
    valid_person(tools["output"])
    [sent] = tools["sent"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "Person"}}
    schema = got["JSON_SCHEMA"]
    valid_person(schema["output"])
    [sent] = schema["sent"]
    assert schema_of(sent)["additionalProperties"] is False
    nested = got["nested"]
    [sent] = nested["sent"]
    assert "$defs" in sent["tools"][0]["function"]["parameters"]
    valid_person(nested["output"]["lead"])
    assert len(nested["output"]["members"]) <= 2
    for member in nested["output"]["members"]:
        valid_person(member)
    # The tiny model cannot follow a schema it is only told about: the service held
    # it to an object, cut by max_tokens.
    json_mode = got["JSON"]
    assert json_mode["error"] == "IncompleteOutputException"
    [sent] = json_mode["sent"]
    assert sent["response_format"] == {"type": "json_object"}
    assert json_mode["text"].startswith('{"')


def test_llm_cli_schema(service) -> None:
    """`llm --schema` against a model named in extra-openai-models.yaml. The concise
    schema `name, age int` leaves `name` unbounded, which the tiny model never ends:
    its answer is checked to be held to the schema and cut by `max_tokens`; a full
    JSON schema with bounds gives a complete answer. The CLI runs in one process
    (click's runner), its log (`llm logs`) read back."""
    got = run(
        service,
        """
        import pathlib, tempfile
        home = pathlib.Path(tempfile.mkdtemp())
        os.environ["LLM_USER_PATH"] = str(home)
        (home / "extra-openai-models.yaml").write_text(
            f"- model_id: textstream\\n  model_name: {MODEL}\\n"
            f"  api_base: {BASE}\\n  supports_schema: true\\n"
        )
        from click.testing import CliRunner
        from llm.cli import cli

        out = {}
        full = json.dumps(Person.model_json_schema())
        for name, schema, tokens in (("concise", "name, age int", 20), ("full", full, 100)):
            ran = CliRunner().invoke(
                cli,
                ["-m", "textstream", "--schema", schema, "-o", "temperature", "0",
                 "-o", "max_tokens", str(tokens), "Who is Ada?"],
                catch_exceptions=False,
            )
            assert ran.exit_code == 0, ran.output
            logged = CliRunner().invoke(cli, ["logs", "--json", "-n", "1"])
            entry = json.loads(logged.output)[0]
            out[name] = {
                "output": ran.output,
                "schema": entry["schema_json"],
                "finish": entry["response_json"]["finish_reason"],
                "output_tokens": entry["output_tokens"],
            }
        print(json.dumps(out))
        """,
    )
    concise = got["concise"]
    assert concise["schema"]["properties"] == {
        "name": {"type": "string"},
        "age": {"type": "integer"},
    }
    assert concise["output"].startswith('{"name":"')
    assert concise["finish"] == "length" and concise["output_tokens"] == 20
    full = got["full"]
    assert full["finish"] == "stop"
    valid_person(json.loads(full["output"]))
