"""The body of `POST /v1/responses` (OpenAI's Responses API), and how it becomes a
chat job: the input's messages, `instructions` as a system message first.

Built: function `tools` (Responses' flat shape: `{"type": "function", "name",
"description", "parameters", "strict"}`) and `tool_choice` (`none`, `auto`,
`required`, `{"type": "function", "name": ...}`), taken as chat's tools are
(tools.py: a forced call is constrained); input items `function_call` and
`function_call_output` become chat's assistant `tool_calls` and `role: tool`
messages. `text.format` `json_schema` and `json_object` are chat's
`response_format`: the same constrained decoding.

What is not built (other tool types, reasoning options, logprobs, stored prompts,
conversations) is refused with a 400 naming the parameter, rather than ignored. The
defaults real clients send for them are accepted (openai-agents sends `include: []`,
`tools: []`, `parallel_tool_calls`, `truncation`, `text: {"format": {"type":
"text"}}`, `reasoning: {}` with every field null...).

No `from __future__ import annotations`: FastAPI and pydantic read these at run time.
"""

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from textstream.api.errors import InvalidInputError
from textstream.api.protocol import Body, GenerationRequest, ModelName
from textstream.grammars import JSON_OBJECT, GrammarError, canonical_schema
from textstream.job import MaxNewTokens, Priority, QueueTimeout, Temperature, TopP
from textstream.tools import ToolError, ToolUse, call_schema, functions_of

#: The roles a message item may have (chat templates know these).
ROLES = frozenset({"user", "assistant", "system", "developer"})
#: Content part types that hold text (`output_text`: an assistant's earlier answer).
TEXT_PARTS = frozenset({"input_text", "output_text", "text"})

#: OpenAI's limits on `metadata`.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512


class ResponsesRequest(Body):
    """Unknown fields are ignored, as OpenAI's API does for fields of newer SDKs."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: ModelName | None = None
    input: str | Annotated[list[dict[str, Any]], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: MaxNewTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    metadata: dict[str, str] | None = None
    store: bool = True
    stream: bool = False
    background: bool = False
    previous_response_id: str | None = None
    # Accepted at their harmless values only (refuse_unsupported).
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    n: int | None = None
    logprobs: Any = None
    prompt: Any = None
    conversation: Any = None
    # Extras, as on the other routes.
    priority: Priority = 0
    queue_timeout: QueueTimeout | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_unset(cls, data: Any) -> Any:
        """`null` means "not set" (as protocol.OpenAISampling takes it)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k == "input"}

    def refuse_unsupported(self) -> None:
        refused = (
            ("reasoning", _has_value(self.reasoning), "reasoning options are not supported"),
            ("include", bool(self.include), "include values are not supported"),
            ("top_logprobs", bool(self.top_logprobs), "logprobs are not supported"),
            ("logprobs", bool(self.logprobs), "logprobs are not supported"),
            ("n", self.n not in (None, 1), "only n=1 is supported"),
            ("prompt", self.prompt is not None, "stored prompts are not supported"),
            ("conversation", self.conversation is not None, "conversations are not supported"),
            ("background", self.background and not self.store, "background needs store=true"),
        )
        for field, refuse, message in refused:
            if refuse:
                raise InvalidInputError(field, message)
        _check_metadata(self.metadata)

    def input_messages(self) -> list[dict[str, Any]]:
        """This turn's messages (without `instructions`): function calls join the
        assistant message before them (or make one), their outputs are `tool` ones."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for item in self.input:
            if not isinstance(item, dict):
                raise InvalidInputError("input", "each input item must be an object")
            kind = item.get("type", "message")
            if kind == "function_call":
                call = _function_call(item)
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif kind == "function_call_output":
                messages.append(_function_call_output(item))
            elif message := _message(item):
                messages.append(message)
        return messages

    def chat_tools(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the tools as a response echoes them, as chat's `tools` take them)."""
        echoed, chat = [], []
        for tool in self.tools or []:
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise InvalidInputError("tools", "only function tools are supported")
            function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            chat.append({"type": "function", "function": function})
            echoed.append(
                {
                    "type": "function",
                    "name": tool.get("name"),
                    "description": tool.get("description"),
                    "parameters": tool.get("parameters"),
                    "strict": tool.get("strict", True),
                }
            )
        return echoed, chat

    def tool_use(self) -> tuple[list[dict[str, Any]] | None, ToolUse | None, str | None]:
        """As chat's (protocol.ChatRequest.tool_use): (the tools to render, how to
        read the answer, the schema a forced call must match)."""
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        _, tools = self.chat_tools()
        try:
            functions = functions_of(tools)
            only = None
            if choice not in ("none", "auto", "required"):
                name = choice.get("name") if isinstance(choice, dict) else None
                if not isinstance(choice, dict) or choice.get("type") != "function":
                    raise ToolError(
                        'tool_choice must be none, auto, required or {"type": "function", ...}',
                        "tool_choice",
                    )
                only = name
            names = frozenset(f["name"] for f in functions)
            if (only is not None or choice == "required") and not names:
                raise ToolError("tool_choice needs tools", "tool_choice")
            if only is not None and only not in names:
                raise ToolError("tool_choice names a function that is not in tools", "tool_choice")
        except ToolError as exc:
            raise InvalidInputError(exc.param, str(exc)) from None
        if not functions or choice == "none":
            return None, None, None
        tools = [{"type": "function", "function": f} for f in functions]
        if choice == "auto":
            return tools, ToolUse(names, constrained=False), None
        if self.output_schema() is not None:
            raise InvalidInputError("text", "not with a required tool call")
        try:
            schema = canonical_schema(
                call_schema(functions, only, self.parallel_tool_calls is not False)
            )
        except GrammarError as exc:
            raise InvalidInputError("tools", str(exc)) from None
        return tools, ToolUse(names, constrained=True), schema

    def output_schema(self) -> str | None:
        """`text.format` as the JSON schema the answer must match (None: text)."""
        form = (self.text or {}).get("format")
        if form is None:
            return None
        kind = form.get("type") if isinstance(form, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return JSON_OBJECT
        if kind != "json_schema":
            raise InvalidInputError("text", "format.type must be text, json_object or json_schema")
        assert isinstance(form, dict)
        if not isinstance(form.get("schema"), dict):
            raise InvalidInputError("text", "format.schema must be a JSON object")
        try:
            return canonical_schema(form["schema"])
        except GrammarError as exc:
            raise InvalidInputError("text", str(exc)) from None

    def generation(
        self, default_max_tokens: int, json_schema: str | None = None
    ) -> GenerationRequest:
        """`json_schema` (a forced tool call's) overrides `text.format`."""
        try:
            return GenerationRequest(
                model=self.model,
                max_new_tokens=self.max_output_tokens or default_max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                json_schema=json_schema or self.output_schema(),
                priority=self.priority,
                queue_timeout=self.queue_timeout,
                # A response's id is its job's: two responses must never share a job.
                use_cache=False,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInputError(str(first["loc"][0]), first["msg"]) from None


def _has_value(options: dict[str, Any] | None) -> bool:
    return any(value is not None for value in (options or {}).values())


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > METADATA_PAIRS:
        raise InvalidInputError("metadata", f"at most {METADATA_PAIRS} pairs")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
            raise InvalidInputError(
                "metadata",
                f"keys are at most {METADATA_KEY_CHARS} characters,"
                f" values at most {METADATA_VALUE_CHARS}",
            )


def _function_call(item: dict[str, Any]) -> dict[str, Any]:
    """A `function_call` input item as one of chat's `tool_calls`."""
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not all(isinstance(v, str) for v in (call_id, name, arguments)):
        raise InvalidInputError("input", "a function_call needs call_id, name and arguments text")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_call_output(item: dict[str, Any]) -> dict[str, Any]:
    """A `function_call_output` input item as chat's `role: tool` message."""
    call_id, output = item.get("call_id"), item.get("output")
    if isinstance(output, list):  # parts: their text
        if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in output):
            raise InvalidInputError("input", "a function_call_output's parts must be text")
        output = "".join(p["text"] for p in output)
    if not isinstance(call_id, str) or not isinstance(output, str):
        raise InvalidInputError("input", "a function_call_output needs call_id and output text")
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _message(item: dict[str, Any]) -> dict[str, str] | None:
    """One input item as a chat message: only message items, of text. A reasoning
    item (a client sending back an earlier turn's output whole, as openai-agents
    does) is left out, as chat templates leave out earlier turns' thinking."""
    kind = item.get("type", "message")
    if kind == "reasoning":
        return None
    if kind != "message":
        raise InvalidInputError("input", f"input items of type {kind!r} are not supported")
    role = item.get("role")
    if role not in ROLES:
        raise InvalidInputError("input", f"a message's role must be one of {sorted(ROLES)}")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidInputError("input", "a message's content must be text or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidInputError("input", f"content parts of type {kind!r} are not supported")
        texts.append(part["text"])
    return {"role": role, "content": "".join(texts)}
