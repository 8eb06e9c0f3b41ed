"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

The official `openai` SDK pointed at `base_url=http://host/v1` works unmodified.
Requests become the same jobs as `/completion` (same submit(), queue, workers,
cache); only the shapes differ. Streaming sends OpenAI chunk objects as `data:`
lines (LF-ended) and ends with `data: [DONE]`; errors use OpenAI's error object
(errors.py). A list of prompts on /v1/completions is a job per prompt, one choice
each by `index` (fanout.py), as OpenAI's and vLLM's API take it (langchain's
`OpenAI.batch` sends one).

Supported beyond OpenAI's own fields, as vLLM accepts them: `top_k`,
`repetition_penalty`, `ignore_eos`, and our `use_cache`. `n` choices are a job
each, as listed prompts are (seed + i for choice i); `logprobs` come from the token
events (worker/completion.py). Unsupported options get a 400 naming the parameter:
`best_of` > 1, `echo`, `suffix`, `logit_bias`, `min_p` > 0, `functions`, token-id
prompts, more than MAX_PROMPTS prompts (prompts × n). Tool calls: textstream/tools.py.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import contextlib
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from textstream import __version__
from textstream.api.deps import services_of
from textstream.api.edge import authorize
from textstream.api.errors import job_error_response, openai_error_body
from textstream.api.fanout import completed_jobs, interleaved, submit_all
from textstream.api.models import ModelNotFoundError, live_models, resolve_model
from textstream.api.protocol import (
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    OpenAISampling,
    Prompt,
)
from textstream.api.relay.sse import Relay, relay_events
from textstream.api.relay.thinking import ThinkSplitter
from textstream.api.responses import job_headers
from textstream.api.status import JobStatus
from textstream.registry import live_workers
from textstream.tools import CALL_OPEN, CallBuffer, ToolUse, parse_calls
from textstream.transport.events import EventType, JobEvent

router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

#: OpenAI's default `max_tokens` for /v1/completions.
COMPLETION_MAX_TOKENS = 16

#: The end of an SSE line on /v1: LF, as OpenAI's and vLLM's streams (sse-starlette
#: writes CRLF unless told; strict line-splitting clients keep the CR otherwise).
SEP = "\n"


class ChunkShape:
    """Builds one request's OpenAI objects (completion vs chat): its chunks, each
    for one choice (`index`: the prompt's place in a list of prompts), and its
    whole answer.

    As OpenAI's stream: a chat choice starts with a chunk of its role and empty
    content; with `include_usage`, every chunk carries `"usage": null` until the
    last, which carries the usage and no choices; chat objects carry a
    `system_fingerprint` (system_fingerprint())."""

    def __init__(
        self,
        chat: bool,
        job_id: str,
        model: str,
        include_usage: bool = False,
        tool_use: ToolUse | None = None,
        logprobs: int | None = None,
    ) -> None:
        self.chat = chat
        #: Alternatives per token the request asked logprobs for (None: no logprobs).
        self.logprobs = logprobs
        self.tool_use = tool_use
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{job_id}"
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage

    def _object(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        made = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.chat:
            made["system_fingerprint"] = system_fingerprint(self.model)
        made["choices"] = choices
        return {**made, **({"usage": None} if self.include_usage else {}), **extra}

    def role_chunk(self, index: int = 0) -> dict[str, Any]:
        """A chat choice's first chunk: its role, and no text yet."""
        delta = {"role": "assistant", "content": ""}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._object("chat.completion.chunk", [choice])

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        reasoning: bool = False,
        index: int = 0,
        calls: list[dict[str, Any]] | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One streamed piece; with `reasoning`, chat sends it as
        `delta.reasoning_content` (as vLLM and DeepSeek do); `calls` as
        `delta.tool_calls`, each whole (name and all its arguments) in one piece;
        `logprobs` those of the piece's tokens (logprobs_object())."""
        if not self.chat:
            choice = {
                "index": index,
                "text": text or "",
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            return self._object("text_completion", [choice])
        delta: dict[str, Any] = {}
        if text is not None:
            delta["reasoning_content" if reasoning else "content"] = text
        if calls:
            delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return self._object("chat.completion.chunk", [choice])

    def logprobs_object(self, entries: list[list[Any]], offset: int = 0) -> dict[str, Any] | None:
        """OpenAI's `logprobs` of a choice (or a chunk) from token events' entries
        ([token, logprob, [[token, logprob], ...]], worker/completion.py): chat's
        `{"content": [...]}`, or the legacy completions shape, whose `text_offset`
        counts from `offset` (the characters of the choice's tokens before these).
        None when the request did not ask for logprobs."""
        if self.logprobs is None:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        **_token_logprob(token, logprob, *raw),
                        "top_logprobs": [_token_logprob(*alt) for alt in top],
                    }
                    for token, logprob, top, *raw in entries
                ]
            }
        offsets = []
        for token, *_ in entries:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": [entry[0] for entry in entries],
            "token_logprobs": [entry[1] for entry in entries],
            "top_logprobs": [{alt[0]: alt[1] for alt in entry[2]} for entry in entries],
            "text_offset": offsets,
        }

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=with_total(usage))

    def whole(self, answers: list[JobStatus]) -> dict[str, Any]:
        """The answer to the request, one choice per job (each done, with usage)."""
        usage = summed(a.usage or {} for a in answers)
        choices = []
        for index, answer in enumerate(answers):
            choice: dict[str, Any] = {"index": index}
            logprobs = self.logprobs_object(answer.logprobs or [])
            calls = None
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": answer.text}
                if answer.thinking:
                    message["reasoning_content"] = answer.thinking
                calls = parse_calls(answer.text or "", self.tool_use) if self.tool_use else None
                if calls:
                    before = (answer.text or "").split(CALL_OPEN)[0].strip()
                    constrained = self.tool_use is not None and self.tool_use.constrained
                    message["content"] = None if constrained or not before else before
                    message["tool_calls"] = calls
                choice["message"] = message
            else:
                choice["text"] = answer.text
            finish = "tool_calls" if self.chat and calls else answer.finish_reason
            choices.append({**choice, "logprobs": logprobs, "finish_reason": finish})
        kind = "chat.completion" if self.chat else "text_completion"
        return self._object(kind, choices, usage=with_total(usage))


@functools.cache
def system_fingerprint(model: str) -> str:
    """OpenAI's `system_fingerprint`: what served the answer, so that a client can
    tell when a change of backend may change answers to the same request. Here the
    release and the served model's name: stable across processes and replicas of
    one release, changed by an upgrade or another model under the name."""
    digest = hashlib.sha256(f"textstream {__version__} {model}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


def _token_logprob(token: str, logprob: float, raw: list[int] | None = None) -> dict[str, Any]:
    """One token as OpenAI's logprobs name it; `bytes`: its UTF-8, or the raw bytes
    the worker added for a piece of a character (whose text is U+FFFD)."""
    return {"token": token, "logprob": logprob, "bytes": raw or list(token.encode())}


def with_total(usage: dict[str, int]) -> dict[str, int]:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def summed(usages: Iterable[dict[str, int]]) -> dict[str, int]:
    total = {"prompt_tokens": 0, "completion_tokens": 0}
    for usage in usages:
        for name in total:
            total[name] += usage.get(name, 0)
    return total


def data(payload: dict[str, Any] | str) -> ServerSentEvent:
    """One `data:` line, ended by LF as OpenAI's (sse-starlette's default is CRLF)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return ServerSentEvent(data=text, sep=SEP)


class ChunkStream:
    """One job's events -> its choice's chunks. Chat splits a leading think block
    into `reasoning_content` (with THINKING=auto); completions stay raw text, as
    vLLM's. The end of the stream (usage, `[DONE]`, or an error) is the request's,
    written by `stream_chunks` once every choice has ended: this keeps its usage or
    its error."""

    def __init__(self, shape: ChunkShape, split_thinking: bool, index: int = 0) -> None:
        self.shape = shape
        self.index = index
        self.splitter = ThinkSplitter() if split_thinking and shape.chat else None
        self.calls = CallBuffer(shape.tool_use) if shape.tool_use is not None else None
        self._sent_role = False
        self.usage: dict[str, int] | None = None
        self.error: dict[str, Any] | None = None
        #: Token events' logprobs not yet sent, and the characters of those sent.
        self._logprobs: list[list[Any]] = []
        self._offset = 0

    def catch_up(self, events: list[JobEvent]) -> None:
        return None  # OpenAI streams are not resumed

    def _chunk(
        self,
        text: str | None,
        finish: str | None = None,
        reasoning: bool = False,
        calls: list[dict[str, Any]] | None = None,
    ) -> Iterable[ServerSentEvent]:
        if self.calls is not None and text and not reasoning:
            text = self.calls.feed(text)  # held back from where a call may begin
            if not text:
                return
        if self.shape.chat and not self._sent_role:
            self._sent_role = True
            yield data(self.shape.role_chunk(self.index))
        logprobs = None
        if self.shape.logprobs is not None and (self._logprobs or finish is None):
            logprobs = self.shape.logprobs_object(self._logprobs, self._offset)
            self._offset += sum(len(entry[0]) for entry in self._logprobs)
            self._logprobs = []
        yield data(self.shape.chunk(text, finish, reasoning, self.index, calls, logprobs))

    def _end(self, finish: str) -> Iterable[ServerSentEvent]:
        if self.calls is None:
            yield from self._chunk(None, finish)
            return
        text, calls = self.calls.finish()
        self.calls = None
        if text:
            yield from self._chunk(text)
        if calls:
            yield from self._chunk(None, calls=calls)
        yield from self._chunk(None, "tool_calls" if calls else finish)

    def convert(self, event: JobEvent) -> Iterable[ServerSentEvent]:
        if event.event == EventType.TOKEN:
            text = event.data["text"]
            self._logprobs.extend(event.data.get("logprobs") or ())
            if self.splitter is None:
                yield from self._chunk(text)
            else:
                for kind, piece in self.splitter.feed(text):
                    yield from self._chunk(piece, reasoning=kind == "thinking")
        elif event.event == EventType.DONE:
            if self.splitter is not None:
                for kind, piece in self.splitter.flush():
                    yield from self._chunk(piece, reasoning=kind == "thinking")
            yield from self._end(event.data["finish_reason"])
            self.usage = event.data["usage"]
        elif event.event == EventType.ERROR:
            error = event.data.get("error") or {}
            self.error = openai_error_body(error.get("type", "error"), error.get("message", ""))


async def stream_chunks(
    shape: ChunkShape, parts: list[tuple[Relay, ChunkStream]]
) -> AsyncIterator[bytes]:
    """The request's stream: each choice's chunks as its job produces them (jobs run
    side by side, so their chunks interleave), then the summed usage when asked for
    and `[DONE]`. An error in any job ends the stream with OpenAI's error object,
    then `[DONE]`; the other jobs are stopped, as if their client had left."""
    streams = [stream for _, stream in parts]
    chunks = interleaved([relay_events(relay, stream) for relay, stream in parts])
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if chunk:
                yield chunk
                continue
            failed = next((s.error for s in streams if s.error is not None), None)
            if failed is not None:
                yield data(failed).encode() + data("[DONE]").encode()
                return
    ended = [s.usage for s in streams if s.usage is not None]
    if len(ended) < len(streams):  # a relay that ended with neither answer nor error
        failed = openai_error_body("generation_failed", "a job ended without an answer")
        yield data(failed).encode() + data("[DONE]").encode()
        return
    tail = [data(shape.usage_chunk(summed(ended)))] if shape.include_usage else []
    yield b"".join(event.encode() for event in [*tail, data("[DONE]")])


async def answer(
    request: Request, body: OpenAISampling, generation: GenerationRequest, prompts: list[Prompt]
) -> Response:
    """Submit each prompt, then stream the chunks or answer once every job ended."""
    services = services_of(request)
    body.refuse_unsupported()
    # n choices per prompt, each a job: choice j of prompt i has index i × n + j.
    jobs, hold = await submit_all(
        request, [(prompt, one) for prompt in prompts for one in body.choices(generation)]
    )
    async with hold:
        include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        chat = prompts[0].messages is not None
        shape = ChunkShape(
            chat,
            jobs[0].job_id,
            jobs[0].model,
            include_usage,
            prompts[0].tool_use,
            generation.logprobs,
        )
        headers = {
            name: ", ".join(job_headers(job)[name] for job in jobs) for name in job_headers(jobs[0])
        }
        if body.stream:
            split = services.settings.thinking == "auto"
            parts = [(relay, ChunkStream(shape, split, i)) for i, relay in enumerate(hold.relays)]
            return hold.stream(stream_chunks(shape, parts), headers, sep=SEP)
        ended = await completed_jobs(request, hold, split_thinking=chat)
    if ended is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    answers, failed = ended
    failed = failed or next((a for a in answers if a.usage is None), None)
    if failed is not None:
        return job_error_response(request, failed.error, headers)
    shape.model = answers[0].model or shape.model
    return JSONResponse(shape.whole(answers), headers=headers)


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest) -> Response:
    """As OpenAI's: the prompt is raw text (no chat template), 16 tokens by default."""
    body.refuse_unsupported()
    prompts = [Prompt("prompt", text, max_tokens_field="max_tokens") for text in body.prompts()]
    limit = services_of(request).settings.max_new_tokens_limit
    max_tokens = body.choice_limit(body.max_tokens or COMPLETION_MAX_TOKENS, limit, "max_tokens")
    generation = body.generation(max_tokens, prompt_format="raw")
    return await answer(request, body, generation, prompts)


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatRequest) -> Response:
    """As OpenAI's: without a limit, the answer runs until the model stops (here,
    at the latest at MAX_NEW_TOKENS_LIMIT or the context window)."""
    body.refuse_unsupported()
    field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    tools, use, schema = body.tool_use()
    prompt = Prompt(
        "messages",
        messages=body.as_messages(),
        max_tokens_field=field,
        continue_final=body.continue_final_message,
        tools=tools,
        tool_use=use,
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
    )
    settings = services_of(request).settings
    most = settings.max_new_tokens_limit
    limit = body.choice_limit(body.max_completion_tokens or body.max_tokens, most, field)
    generation = body.generation(limit or most, json_schema=schema)
    return await answer(request, body, generation, [prompt])


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """Every model live workers serve, with its context window (as vLLM's). With no
    worker up yet (the first minute of a first run), the one a request naming no
    model goes to, without a window: a client that lists the models and picks the
    first (the README's snippet) is answered once the worker is up, not an
    IndexError."""
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
    workers = await live_workers(services.redis)
    windows: dict[str, int | None] = {w.model: w.context_length for w in workers}
    if not windows:
        windows[await resolve_model(services, None)] = None  # loading
    created = int(time.time())
    cards: list[dict[str, Any]] = []
    for name in sorted(windows):
        card = {"id": name, "object": "model", "created": created, "owned_by": "textstream"}
        if windows[name] is not None:
            card["max_model_len"] = windows[name]
        cards.append(card)
    return cards
