"""A stored /v1/responses response: what its request said (echoed in every response
object, from any API process) and the conversation so far, for a later request's
`previous_response_id`.

It is one JSON value on the queue's Redis (REDIS_URL: keys.stored_response), next to
nothing of the job's: the job's stream may live on another Redis or a Cluster, and
its scripts touch only the job's own keys. It expires RESPONSES_TTL after it was
written (capped so that it never outlives its job's events, which hold the output).

The conversation is carried whole: a response's record holds every earlier message
of its chain (the previous records' messages, and their answers), plus this turn's
input; its own answer is read from its job's events when a later turn needs it. So
a chain needs only its last response to be kept. `instructions` are not carried
over, as OpenAI's are not. `store=false` writes nothing: no later request can name it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from textstream import keys
from textstream.api.deps import Services
from textstream.tools import ToolUse

#: What a response's id is made of: `resp_` and its job's id.
RESPONSE_PREFIX = "resp_"


def response_id(job_id: str) -> str:
    return RESPONSE_PREFIX + job_id


def job_id_of(response_id: str) -> str:
    """The job id inside a response id ("" when it is not one of ours)."""
    return response_id.removeprefix(RESPONSE_PREFIX) if response_id.startswith("resp_") else ""


@dataclass
class StoredResponse:
    """A response's request, as its objects echo it, and its conversation."""

    model: str
    background: bool = False
    store: bool = True
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    metadata: dict[str, str] = field(default_factory=dict)
    previous_response_id: str | None = None
    parallel_tool_calls: bool = True
    #: As sent: none, auto, required or {"type": "function", "name": ...}.
    tool_choice: Any = "auto"
    #: The function tools, in Responses' flat shape.
    tools: list[dict[str, Any]] = field(default_factory=list)
    #: `text` as sent: its `format` is text, json_object or json_schema.
    text: dict[str, Any] = field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    #: Every message of the conversation up to this turn's input (no instructions),
    #: chat's: with assistant `tool_calls` and `role: tool` results.
    messages: list[dict[str, Any]] = field(default_factory=list)

    def tool_use(self) -> ToolUse | None:
        """How the answer is read for calls (as the request's tool_use() decided)."""
        if not self.tools or self.tool_choice == "none":
            return None
        names = frozenset(tool["name"] for tool in self.tools)
        return ToolUse(names, constrained=self.tool_choice != "auto")

    def prompt_messages(self) -> list[dict[str, Any]]:
        """What the model is given: the instructions first, then the conversation."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return system + self.messages

    def echo(self) -> dict[str, Any]:
        """The request's fields as a response object carries them."""
        fields = asdict(self)
        del fields["messages"]
        return fields


async def save(services: Services, job_id: str, stored: StoredResponse) -> None:
    text = json.dumps(asdict(stored), ensure_ascii=False)
    await services.redis.set(keys.stored_response(job_id), text, ex=services.settings.responses_ttl)


async def load(services: Services, job_id: str) -> StoredResponse | None:
    text = await services.redis.get(keys.stored_response(job_id))
    if text is None:
        return None
    return StoredResponse(**json.loads(text))


async def forget(services: Services, job_id: str) -> bool:
    return bool(await services.redis.delete(keys.stored_response(job_id)))
