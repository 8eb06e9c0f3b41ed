"""The request bodies and query strings the API accepts (as vLLM's protocol.py).

Sampling fields use the types declared once in textstream/job.py. Each model knows
how to become a `GenerationRequest`, the common form submit() takes.

No `from __future__ import annotations`: FastAPI and pydantic read these at run time.
"""

import functools
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from textstream.api.errors import InvalidInputError
from textstream.grammars import JSON_OBJECT, GrammarError, canonical_schema
from textstream.job import (
    MaxNewTokens,
    Penalty,
    Priority,
    PromptFormat,
    QueueTimeout,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    normalize_stop,
)
from textstream.tools import ToolError, ToolUse, call_schema, chosen_name, functions_of

#: A model's name as a request gives it: not empty (that is no name, not the
#: default), and short (a 404 repeats it).
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


@dataclass(frozen=True)
class Prompt:
    """What to complete: text, or chat messages; `field` names it in errors."""

    field: str
    text: str = ""
    messages: list[dict[str, Any]] | None = None
    #: OpenAI's `tools`, rendered into the prompt (prompts.py).
    tools: list[dict[str, Any]] | None = None
    #: How the answer is read for tool calls (None: plain text).
    tool_use: ToolUse | None = None
    #: `tool_choice` and `parallel_tool_calls` as sent (for an upstream engine).
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    #: The name the client used for the token limit (`max_tokens` on /v1).
    max_tokens_field: str = "max_new_tokens"
    #: Continue the last (assistant) message (vLLM's `continue_final_message`).
    continue_final: bool = False

    @property
    def schema_field(self) -> str:
        """The name the client used for the output's schema (`response_format` on /v1)."""
        if self.tool_use is not None and self.tool_use.constrained:
            return "tools"
        if self.max_tokens_field == "max_output_tokens":  # /v1/responses: text.format
            return "text"
        return "json_schema" if self.max_tokens_field == "max_new_tokens" else "response_format"

    @property
    def checked_text(self) -> str:
        if self.messages is None:
            return self.text
        return "\n".join(m.get("content") or "" for m in self.messages)


class Body(BaseModel):
    """Every request model: no string anywhere in it may hold a lone surrogate
    (JSON's "\\ud800" decodes to one). Such text cannot be encoded as UTF-8, so it
    would fail later, in Redis or in the tokenizer; it is refused here, naming the
    field, like any other invalid input.

    A JSON body's numbers and booleans must be JSON numbers and booleans, as
    OpenAI's API has them: pydantic's lax mode took `"temperature": true` as 1.0,
    `"n": "1"` as 1 and `"stream": "false"` as false. A query string's values are
    all text, so a model read from one says so (`json_typed = False`)."""

    json_typed: ClassVar[bool] = True

    @field_validator("*", mode="before")
    @classmethod
    def _json_types(cls, value: Any, info: ValidationInfo) -> Any:
        if not cls.json_typed or value is None or info.field_name is None:
            return value
        kinds, of_list = _field_kinds(cls, info.field_name)
        if not kinds:
            return value
        for one in value if of_list and isinstance(value, list) else [value]:
            _check_json_type(kinds, one)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        if _has_surrogate(value):
            raise ValueError("text must be valid Unicode (it holds a lone surrogate)")
        return value

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode_everywhere(cls, data: Any) -> Any:
        """The same for what no field takes: key names, and fields a model ignores
        (a chat message's `name`). The text is not repeated: it cannot be encoded."""
        if isinstance(data, dict):
            for key, value in data.items():
                if key not in cls.model_fields and (_has_surrogate(key) or _has_surrogate(value)):
                    raise ValueError(
                        "text must be valid Unicode (a field name, or a field not used"
                        " here, holds a lone surrogate)"
                    )
        return data


@functools.cache
def _field_kinds(model: type[BaseModel], field: str) -> tuple[frozenset[type], bool]:
    """The JSON scalar types a model's field (or each item of a list field) takes,
    and whether it is a list: read from its annotation once, not per request."""
    annotation = model.model_fields[field].annotation
    items = _list_item(annotation)
    kinds = _scalar_kinds(items if items is not None else annotation)
    return frozenset(kinds), items is not None


def _check_json_type(kinds: frozenset[type], value: Any) -> None:
    if kinds == {bool} and not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "Input should be true or false")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kinds and kinds <= {int, float} and not number:
        raise PydanticCustomError("number_type", "Input should be a number")


def _list_item(annotation: Any) -> Any:
    """X for a field of `list[X]` (optional or annotated too), else None."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _list_item(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _list_item(args[0]) if len(args) == 1 else None
    return typing.get_args(annotation)[0] if origin is list else None


def _scalar_kinds(annotation: Any) -> set[type]:
    """The JSON scalar types a field takes (bool, int, float), or an empty set when
    it takes anything else too (text, lists, models, literals): only fields of
    numbers or booleans alone are held to their JSON type."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar_kinds(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [_scalar_kinds(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return set().union(*kinds) if all(kinds) else set()
    return {annotation} if annotation in (bool, int, float) else set()


def _has_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return not value.isascii() and any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, list | tuple):
        return any(_has_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    return False


# -- chat messages, on /jobs and /v1/chat/completions ------------------------------------


class TextPart(Body):
    type: Literal["text"]
    text: str


class ToolCallFunction(Body):
    name: str
    arguments: str = "{}"


class ToolCall(Body):
    """A call an earlier assistant message made (OpenAI's `tool_calls` item)."""

    id: str = ""
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    #: An assistant's earlier calls, and a tool result's answer to one of them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


# -- the native API -----------------------------------------------------------------


class GenerationRequest(Body):
    """Sampling fields a client may send: the `/completion` query string and the
    `POST /jobs` body share them. `max_new_tokens` defaults per deployment."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: ModelName | None = Field(None, description="a served model (default: the one served)")
    max_new_tokens: MaxNewTokens | None = Field(None, description="default DEFAULT_MAX_NEW_TOKENS")
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    ignore_eos: bool = False
    prompt_format: PromptFormat = "auto"
    stop: list[str] | str | None = Field(None, description="up to 4 stop strings")
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    use_cache: bool = Field(True, description="answer identical deterministic requests from cache")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="a JSON schema (or its JSON text) the output must match"
    )
    priority: Priority = 0
    queue_timeout: QueueTimeout | None = None
    logprobs: TopLogprobs | None = Field(
        None, description="each token's logprob and this many alternatives (token events)"
    )

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | str | None) -> list[str]:
        return normalize_stop(value)

    @field_validator("json_schema")
    @classmethod
    def _json_schema(cls, value: dict[str, Any] | str | None) -> str | None:
        """Canonical JSON text (grammars.py), as the job carries it."""
        return None if value is None else canonical_schema(value)

    def sampling(self, default_max_new_tokens: int) -> SamplingParams:
        fields = self.model_dump(
            exclude={
                "model",
                "prompt_format",
                "prompt",
                "messages",
                "use_cache",
                "stream",
                "priority",
                "queue_timeout",
            }
        )
        fields["max_new_tokens"] = self.max_new_tokens or default_max_new_tokens
        fields["stop"] = normalize_stop(self.stop)
        return SamplingParams(**fields)


class CompletionQuery(GenerationRequest):
    """`/completion/{question}` query string: the sampling fields, plus `stream`."""

    json_typed: ClassVar[bool] = False  # a query string: every value is text

    stream: bool = Field(True, description="false: one JSON answer once the job is done")
    json_schema: str | None = Field(None, description="a JSON schema's text the output must match")


class JobRequest(GenerationRequest):
    """`POST /jobs` body: a `prompt`, or chat `messages` (as OpenAI's chat API takes
    them: the worker applies the model's chat template). Unknown fields are
    refused: a typo such as `max_token` would otherwise be silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None

    def as_prompt(self) -> Prompt:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidInputError("prompt", "give either `prompt` or `messages`")
        if self.messages is not None:
            return Prompt("messages", messages=[m.as_dict() for m in self.messages])
        return Prompt("prompt", self.prompt or "")


# -- the OpenAI-compatible API --------------------------------------------------------


class StreamOptions(Body):
    include_usage: bool = False


class OpenAISampling(Body):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's API does
    for fields it does not know from newer SDKs."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: ModelName
    max_tokens: MaxNewTokens | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    #: vLLM's convention: -1 (or 0) turns top-k off.
    top_k: int = Field(0, ge=-1, le=2**31 - 1, description="extra: 0 or -1 = off")
    repetition_penalty: RepetitionPenalty = Field(1.0, description="extra")
    ignore_eos: bool = Field(False, description="extra")
    use_cache: bool = Field(
        True, description="extra: answer identical deterministic requests from cache"
    )
    #: vLLM's extra, not implemented here: refused unless off, rather than ignored
    #: (a client asking for it would silently sample without it).
    min_p: float | None = Field(None, description="extra: only 0 (off) is supported")
    #: `json_object` or `json_schema` (its `strict` is always true here); on
    #: /v1/completions too, as vLLM takes it.
    response_format: dict[str, Any] | None = None
    priority: Priority = 0
    queue_timeout: QueueTimeout | None = None

    @model_validator(mode="before")
    @classmethod
    def null_is_unset(cls, data: Any) -> Any:
        """`null` for an optional field means "not set", its default, as OpenAI's API
        and vLLM take it: clients that write every field (`"temperature": null`)
        must not get a 400 for it. A required field's null is still refused."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }

    def refuse_unsupported(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise InvalidInputError("n", f"n must be 1 to {MAX_N}")
        if self.logit_bias:
            raise InvalidInputError("logit_bias", "logit_bias is not supported")
        if self.min_p:
            raise InvalidInputError("min_p", "min_p is not supported (0 or null: off)")

    def output_schema(self) -> str | None:
        """`response_format` as the schema a job carries (None: free text)."""
        fmt = self.response_format
        kind = None if fmt is None else fmt.get("type")
        if fmt is None or kind == "text":
            return None
        if kind == "json_object":
            return JSON_OBJECT
        if kind != "json_schema":
            raise InvalidInputError(
                "response_format", "type must be text, json_object or json_schema"
            )
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise InvalidInputError("response_format", "json_schema.schema must be a JSON object")
        try:
            return canonical_schema(spec["schema"])
        except GrammarError as exc:
            raise InvalidInputError("response_format", str(exc)) from None

    def top_logprobs_asked(self) -> int | None:
        """How many alternatives per token the request asks logprobs for (None: no
        logprobs)."""
        return None

    def choice_limit(self, max_tokens: int | None, limit: int, field: str) -> int | None:
        """Each choice's token limit with `n` > 1: the request as a whole may
        generate no more than MAX_NEW_TOKENS_LIMIT, so `n` × `max_tokens` must fit
        it, and a request without `max_tokens` gives each choice its share."""
        if self.n <= 1 or not 1 <= self.n <= MAX_N:
            return max_tokens
        if max_tokens is None:
            return max(1, limit // self.n)
        if self.n * max_tokens > limit:
            raise InvalidInputError(
                "n", f"n × {field} is {self.n * max_tokens}; the limit is {limit}"
            )
        return max_tokens

    def choices(self, generation: GenerationRequest) -> list[GenerationRequest]:
        """Each of the `n` choices' generation: a seeded request's choice i uses
        seed + i, so that its n answers differ and each can be reproduced."""
        if self.n <= 1:
            return [generation]
        if generation.seed is None:
            return [generation] * self.n
        return [
            generation.model_copy(update={"seed": (generation.seed + i) % 2**63})
            for i in range(self.n)
        ]

    def generation(
        self,
        max_tokens: int | None,
        prompt_format: PromptFormat = "auto",
        json_schema: str | None = None,
    ) -> GenerationRequest:
        """The common form; `json_schema` (a forced tool call's) overrides
        `response_format`."""
        try:
            return GenerationRequest(
                model=self.model,
                max_new_tokens=max_tokens,
                prompt_format=prompt_format,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=max(self.top_k, 0),
                seed=self.seed,
                ignore_eos=self.ignore_eos,
                stop=self.stop,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                use_cache=self.use_cache,
                json_schema=json_schema or self.output_schema(),
                priority=self.priority,
                queue_timeout=self.queue_timeout,
                logprobs=self.top_logprobs_asked(),
            )
        except ValidationError as exc:  # a stop list the native API refuses too
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "stop"
            raise InvalidInputError(field, first["msg"].removeprefix("Value error, ")) from None


#: The most prompts one /v1/completions request may list. Each becomes a job of its
#: own, holding a place in the queue and a stream slot until it ends, so a longer
#: batch belongs in several requests; langchain's `OpenAI` sends 20 at a time.
MAX_PROMPTS = 32

#: The most choices (`n`) one request may ask for: each is a job of its own, as a
#: listed prompt is (with a list of prompts, prompts × n is at most MAX_PROMPTS).
MAX_N = 16

#: OpenAI's bound on /v1/completions' `logprobs` (the legacy API's).
MAX_COMPLETION_LOGPROBS = 5


class CompletionRequest(OpenAISampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, value: Any) -> Any:
        """Token ids (a list of numbers, or of lists) are refused by name, rather
        than with pydantic's account of every union branch they failed."""
        if isinstance(value, list) and any(not isinstance(item, str) for item in value):
            raise PydanticCustomError(
                "text_prompt", "token-id prompts are not supported: send text, or a list of texts"
            )
        return value

    def prompts(self) -> list[str]:
        """The prompt, or each of a list of them (one choice each, by `index`)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt or len(self.prompt) > MAX_PROMPTS:
            raise InvalidInputError("prompt", f"give 1 to {MAX_PROMPTS} prompts in a list")
        if len(self.prompt) * self.n > MAX_PROMPTS:
            raise InvalidInputError(
                "n", f"prompts × n is {len(self.prompt) * self.n}; the limit is {MAX_PROMPTS}"
            )
        return self.prompt

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for field, value in (
            ("echo", self.echo),
            ("best_of", self.best_of not in (None, 1)),
            ("suffix", bool(self.suffix)),
        ):
            if value:
                raise InvalidInputError(field, f"{field} is not supported")


class ChatRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: MaxNewTokens | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None  # the older form of tools
    function_call: Any = None
    #: vLLM's: continue the final (assistant) message rather than answer it. How a
    #: relaying textstream worker resumes a chat after a takeover.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    parallel_tool_calls: bool | None = None

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def as_messages(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.messages]

    def tool_use(self) -> tuple[list[dict[str, Any]] | None, ToolUse | None, str | None]:
        """(the tools to render, how to read the answer, the schema a forced call
        must match): nothing without tools or with `tool_choice: none`."""
        choice = self.tool_choice if self.tool_choice is not None else "auto"
        try:
            functions = functions_of(self.tools or [])
            only = None if choice in ("none", "auto", "required") else chosen_name(choice)
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
            raise InvalidInputError("response_format", "not with a required tool call")
        parallel = self.parallel_tool_calls is not False
        try:
            schema = canonical_schema(call_schema(functions, only, parallel))
        except GrammarError as exc:
            raise InvalidInputError("tools", str(exc)) from None
        return tools, ToolUse(names, constrained=True), schema

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidInputError("top_logprobs", "top_logprobs needs logprobs: true")
        # Refused rather than ignored: a client that offers functions must not take
        # a plain answer for the model's choice not to call one.
        for field, value in (
            ("functions", self.functions),
            ("function_call", self.function_call not in (None, "none", "auto")),
        ):
            if value:
                raise InvalidInputError(field, f"{field} are not supported")
        if self.continue_final_message and (
            self.add_generation_prompt or self.messages[-1].role != "assistant"
        ):
            raise InvalidInputError(
                "continue_final_message",
                "needs add_generation_prompt=false and an assistant message last",
            )
