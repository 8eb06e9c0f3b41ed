"""The body of `POST /v1/responses` (OpenAI's Responses API), and how it becomes a
chat job: the input's messages, `instructions` as a system message first.

What is not built (tools, structured output, reasoning options, logprobs, stored
prompts, conversations) is refused with a 400 naming the parameter, rather than
ignored: a client that offers tools must not take a plain answer for the model's
choice not to call one. The defaults real clients send for them are accepted
(openai-agents sends `include: []`, `tools: []`, `parallel_tool_calls`, `truncation`,
`text: {"format": {"type": "text"}}`, `reasoning: {}` with every field null...).

No `from __future__ import annotations`: FastAPI and pydantic read these at run time.
"""

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from textstream.api.errors import InvalidInputError
from textstream.api.protocol import Body, GenerationRequest, ModelName
from textstream.job import MaxNewTokens, Temperature, TopP

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

    @model_validator(mode="before")
    @classmethod
    def null_is_unset(cls, data: Any) -> Any:
        """`null` means "not set" (as protocol.OpenAISampling takes it)."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k == "input"}

    def refuse_unsupported(self) -> None:
        refused = (
            ("tools", bool(self.tools), "tools are not supported"),
            (
                "tool_choice",
                self.tool_choice not in (None, "none", "auto"),
                "tools are not supported",
            ),
            ("text", not _text_format_is_text(self.text), "only text output is supported"),
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

    def input_messages(self) -> list[dict[str, str]]:
        """This turn's messages (without `instructions`)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [message for item in self.input if (message := _message(item))]

    def generation(self, default_max_tokens: int) -> GenerationRequest:
        try:
            return GenerationRequest(
                model=self.model,
                max_new_tokens=self.max_output_tokens or default_max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                # A response's id is its job's: two responses must never share a job.
                use_cache=False,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidInputError(str(first["loc"][0]), first["msg"]) from None


def _text_format_is_text(text: dict[str, Any] | None) -> bool:
    form = (text or {}).get("format")
    return form is None or (isinstance(form, dict) and form.get("type") == "text")


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
