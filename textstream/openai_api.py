"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

The official `openai` SDK pointed at `base_url=http://host/v1` works unmodified.
Requests become the same jobs as `/completion` (same queue, workers, cache);
only the shapes differ. Streaming sends OpenAI chunk objects as `data:` lines and
ends with `data: [DONE]`; errors use OpenAI's error object (mapped in api.py).

Supported beyond OpenAI's own fields, as vLLM accepts them: `top_k`,
`repetition_penalty`, `ignore_eos`, and our `use_cache`. Unsupported options get a
400 naming the parameter: `n`/`best_of` > 1, `logprobs`, `echo`, `suffix`,
`logit_bias`, tools, non-text response formats, token-id prompts.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import json
import time
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import ServerSentEvent

from textstream.cache import served_model
from textstream.events import EventType, JobEvent
from textstream.ops import authorize
from textstream.registry import live_workers
from textstream.routes import completed_job, job_error, job_headers, sse_response
from textstream.schemas import GenerationRequest
from textstream.service import (
    InvalidInputError,
    Services,
    check_context_window,
    check_prompt,
    check_request,
    start_job,
)
from textstream.sse import Relay, relay_events

router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's API does
    for fields it does not know from newer SDKs."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int = Field(0, ge=-1, description="extra: 0 or -1 = off")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extra")
    ignore_eos: bool = Field(False, description="extra")
    use_cache: bool = Field(
        True, description="extra: answer identical deterministic requests from cache"
    )

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise InvalidInputError("n", "only n=1 is supported")
        if self.logit_bias:
            raise InvalidInputError("logit_bias", "logit_bias is not supported")

    def generation(self, max_tokens: int | None) -> GenerationRequest:
        try:
            return GenerationRequest(
                max_new_tokens=max_tokens,
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
            )
        except ValueError as exc:
            raise InvalidInputError("stop", str(exc).splitlines()[-1]) from None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise InvalidInputError("prompt", "exactly one prompt per request is supported")
            return self.prompt[0]
        return self.prompt

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for field, value in (
            ("echo", self.echo),
            ("logprobs", self.logprobs is not None),
            ("best_of", (self.best_of or 1) != 1),
            ("suffix", bool(self.suffix)),
        ):
            if value:
                raise InvalidInputError(field, f"{field} is not supported")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise InvalidInputError("logprobs", "logprobs are not supported")
        if self.tools:
            raise InvalidInputError("tools", "tools are not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidInputError("response_format", "only text responses are supported")


class ChunkShape:
    """Builds one endpoint's OpenAI objects (completion vs chat) for one job."""

    def __init__(self, chat: bool, job_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"
        self.model = model
        self.created = int(time.time())
        self._sent_role = False

    def _object(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        if not self.chat:
            choice = {
                "index": 0,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return self._object("text_completion", [choice])
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if not self._sent_role:
            delta["role"], self._sent_role = "assistant", True
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._object("chat.completion.chunk", [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=with_total(usage))

    def whole(self, text: str, finish_reason: str | None, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return self._object("chat.completion", [choice], usage=with_total(usage))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice], usage=with_total(usage))


def with_total(usage: dict[str, int]) -> dict[str, int]:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def openai_error(error: dict[str, Any]) -> dict[str, Any]:
    return {
        "error": {
            "message": error.get("message", ""),
            "type": error.get("type", "server_error"),
            "param": None,
            "code": error.get("type"),
        }
    }


def data(payload: dict[str, Any] | str) -> ServerSentEvent:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return ServerSentEvent(data=text)


class ChunkStream:
    """Job events -> OpenAI stream lines."""

    def __init__(self, shape: ChunkShape, include_usage: bool) -> None:
        self.shape = shape
        self.include_usage = include_usage

    def convert(self, event: JobEvent) -> Iterable[ServerSentEvent]:
        if event.event == EventType.TOKEN:
            yield data(self.shape.chunk(event.data["text"]))
        elif event.event == EventType.DONE:
            yield data(self.shape.chunk(None, event.data["finish_reason"]))
            if self.include_usage:
                yield data(self.shape.usage_chunk(event.data["usage"]))
            yield data("[DONE]")
        elif event.event == EventType.ERROR:
            yield data(openai_error(event.data.get("error", {})))
            yield data("[DONE]")


async def answer(
    request: Request,
    body: OpenAISampling,
    max_tokens: int | None,
    prompt: str,
    messages: list[dict[str, str]] | None,
) -> Response:
    services: Services = request.app.state.services
    body.refuse_unsupported()
    generation = body.generation(max_tokens)
    check_request(generation, services.settings)
    await check_context_window(services, prompt, generation, "prompt", messages=messages)
    job = await start_job(services, generation, prompt=prompt, messages=messages, reader=True)
    relay = Relay(services.jobs, services.settings, job.job_id, job.deadline, True)
    model = await served_model(services.redis) or body.model
    shape = ChunkShape(messages is not None, job.job_id, model)
    headers = job_headers(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = ChunkStream(shape, include_usage)
        return await sse_response(request, relay_events(relay, chunks.convert), headers)
    status = await completed_job(request, relay)
    if status is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    if status.status != "done" or status.usage is None:
        error, code = job_error(status)
        # OpenAI answers invalid input with 400 where our API uses 422.
        return JSONResponse(openai_error(error), 400 if code == 422 else code, headers=headers)
    shape.model = status.model or shape.model
    return JSONResponse(
        shape.whole(status.text, status.finish_reason, status.usage), headers=headers
    )


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    prompt = body.text()
    check_prompt(prompt, request.app.state.services.settings, "prompt")
    return await answer(request, body, body.max_tokens, prompt, None)


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    messages = body.as_messages()
    check_prompt(
        "\n".join(m["content"] for m in messages), request.app.state.services.settings, "messages"
    )
    return await answer(request, body, body.max_completion_tokens or body.max_tokens, "", messages)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    services: Services = request.app.state.services
    workers = await live_workers(services.redis, services.settings.worker_heartbeat_seconds)
    names = sorted({w.model for w in workers}) or [
        m for m in [await served_model(services.redis)] if m
    ]
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "textstream"}
            for name in names
        ],
    }
