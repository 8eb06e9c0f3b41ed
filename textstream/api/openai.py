"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

The official `openai` SDK pointed at `base_url=http://host/v1` works unmodified.
Requests become the same jobs as `/completion` (same submit(), queue, workers,
cache); only the shapes differ. Streaming sends OpenAI chunk objects as `data:`
lines and ends with `data: [DONE]`; errors use OpenAI's error object (errors.py).

Supported beyond OpenAI's own fields, as vLLM accepts them: `top_k`,
`repetition_penalty`, `ignore_eos`, and our `use_cache`. Unsupported options get a
400 naming the parameter: `n`/`best_of` > 1, `logprobs`, `echo`, `suffix`,
`logit_bias`, `min_p` > 0, tools, non-text response formats, token-id prompts.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import json
import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from textstream.api.deps import authorize, services_of
from textstream.api.errors import job_error_response, openai_error_body
from textstream.api.models import ModelNotFoundError, live_models
from textstream.api.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    OpenAISampling,
    Prompt,
)
from textstream.api.responses import completed_job, job_headers, relay_for, sse_response
from textstream.api.submit import CancelPolicy, submit
from textstream.registry import live_workers
from textstream.transport.events import EventType, JobEvent
from textstream.transport.sse import relay_events
from textstream.transport.thinking import ThinkSplitter

router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

#: OpenAI's default `max_tokens` for /v1/completions.
COMPLETION_MAX_TOKENS = 16


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

    def chunk(
        self, text: str | None, finish_reason: str | None = None, reasoning: bool = False
    ) -> dict[str, Any]:
        """One streamed piece; with `reasoning`, chat sends it as
        `delta.reasoning_content` (as vLLM and DeepSeek do)."""
        if not self.chat:
            choice = {
                "index": 0,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return self._object("text_completion", [choice])
        delta: dict[str, Any] = {}
        if text is not None:
            delta["reasoning_content" if reasoning else "content"] = text
        if not self._sent_role:
            delta["role"], self._sent_role = "assistant", True
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._object("chat.completion.chunk", [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=with_total(usage))

    def whole(
        self, text: str, finish_reason: str | None, usage: dict[str, int], thinking: str = ""
    ) -> dict[str, Any]:
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["reasoning_content"] = thinking
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


def data(payload: dict[str, Any] | str) -> ServerSentEvent:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return ServerSentEvent(data=text)


class ChunkStream:
    """Job events -> OpenAI stream lines. Chat splits a leading think block into
    `reasoning_content` (with THINKING=auto); completions stay raw text, as vLLM's."""

    def __init__(self, shape: ChunkShape, include_usage: bool, split_thinking: bool) -> None:
        self.shape = shape
        self.include_usage = include_usage
        self.splitter = ThinkSplitter() if split_thinking and shape.chat else None

    def catch_up(self, events: list[JobEvent]) -> None:
        return None  # OpenAI streams are not resumed

    def _pieces(self, pieces: Iterable[tuple[str, str]]) -> Iterable[ServerSentEvent]:
        for kind, text in pieces:
            yield data(self.shape.chunk(text, reasoning=kind == "thinking"))

    def convert(self, event: JobEvent) -> Iterable[ServerSentEvent]:
        if event.event == EventType.TOKEN:
            text = event.data["text"]
            if self.splitter is None:
                yield data(self.shape.chunk(text))
            else:
                yield from self._pieces(self.splitter.feed(text))
        elif event.event == EventType.DONE:
            if self.splitter is not None:
                yield from self._pieces(self.splitter.flush())
            yield data(self.shape.chunk(None, event.data["finish_reason"]))
            if self.include_usage:
                yield data(self.shape.usage_chunk(event.data["usage"]))
            yield data("[DONE]")
        elif event.event == EventType.ERROR:
            error = event.data.get("error") or {}
            yield data(openai_error_body(error.get("type", "error"), error.get("message", "")))
            yield data("[DONE]")


async def answer(
    request: Request, body: OpenAISampling, generation: GenerationRequest, prompt: Prompt
) -> Response:
    services = services_of(request)
    body.refuse_unsupported()
    policy = CancelPolicy.ON_DISCONNECT
    job = await submit(services, request.state.caller, prompt, generation, policy)
    relay = relay_for(request, job.job_id, job.model, job.deadline, policy, job.first)
    shape = ChunkShape(prompt.messages is not None, job.job_id, job.model)
    headers = job_headers(job)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = ChunkStream(shape, include_usage, services.settings.thinking == "auto")
        return await sse_response(request, relay_events(relay, chunks), headers, job.slot)
    status = await completed_job(request, relay, job.slot, split_thinking=shape.chat)
    if status is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    if status.status != "done" or status.usage is None:
        return job_error_response(request, status.error, headers)
    shape.model = status.model or shape.model
    whole = shape.whole(status.text, status.finish_reason, status.usage, status.thinking or "")
    return JSONResponse(whole, headers=headers)


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    """As OpenAI's: the prompt is raw text (no chat template), 16 tokens by default."""
    prompt = Prompt("prompt", body.text(), max_tokens_field="max_tokens")
    generation = body.generation(body.max_tokens or COMPLETION_MAX_TOKENS, prompt_format="raw")
    return await answer(request, body, generation, prompt)


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    """As OpenAI's: without a limit, the answer runs until the model stops (here,
    at the latest at MAX_NEW_TOKENS_LIMIT or the context window)."""
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    prompt = Prompt(
        "messages",
        messages=body.as_messages(),
        max_tokens_field=field,
        continue_final=body.continue_final_message,
    )
    limit = body.max_completion_tokens or body.max_tokens
    generation = body.generation(limit or services_of(request).settings.max_new_tokens_limit)
    return await answer(request, body, generation, prompt)


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """Every model live workers serve, with its context window (as vLLM's)."""
    return {"object": "list", "data": await _model_cards(request)}


@router.get("/models/{model:path}")
async def model(request: Request, model: str) -> dict[str, Any]:
    """One served model (the SDK's `models.retrieve`); 404 if no live worker serves it."""
    for card in await _model_cards(request):
        if card["id"] == model:
            return card
    services = services_of(request)
    raise ModelNotFoundError(model, await live_models(services))


async def _model_cards(request: Request) -> list[dict[str, Any]]:
    services = services_of(request)
    workers = await live_workers(services.redis, services.settings.worker_heartbeat_seconds)
    windows = {w.model: w.context_length for w in workers}
    created = int(time.time())
    return [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "textstream",
            "max_model_len": windows[name],
        }
        for name in sorted(windows)
    ]
