"""An engine that streams from an OpenAI-compatible server: vLLM, SGLang, TGI,
llama.cpp's llama-server, Ollama, a hosted API, or another textstream.

`MODEL_ID=openai:<base url>#<model>` (for example
`openai:http://gpu-1:8000/v1#Qwen/Qwen2.5-7B-Instruct`), with UPSTREAM_API_KEY.
Each job is one streaming request through the official `openai` SDK:

- completions (prompt_format `raw`) go to /completions; chat messages, and prompts
  in `chat` format, to /chat/completions. `auto` means chat (upstream models are
  usually instruct models).
- Sampling parameters, stop strings and the seed pass through; `top_k`,
  `repetition_penalty` and `ignore_eos` go as vLLM's extra fields, only when set,
  so a strict hosted API never sees them.
- Cancel closes the upstream stream, so the upstream aborts its own work (vLLM,
  llama.cpp and textstream all cancel on disconnect). The stream is read on a
  thread of its own (upstream.py), so a cancel or the job's deadline is seen within
  a fraction of a second even while the upstream sends only keep-alive comments, a
  trickle, or nothing at all; UPSTREAM_TIMEOUT is the longest it may go without a
  chunk (not per read), and one piece is held to UPSTREAM_MAX_PIECE_CHARS.
- A takeover, or a retry after the upstream failed mid-stream, continues where the
  text stopped: completions send prompt + the text already published; chat sends
  it as a partial assistant message with vLLM's `continue_final_message` (servers
  without it, such as OpenAI's, start a new answer instead: documented).
- 429, 5xx, connection errors and a stream cut short (no finish reason) are
  retried with exponential backoff within the job's deadline; each retry continues
  after what was received and asks only for what is left, so no piece is doubled
  and an upstream that ignores `max_tokens` is cut off at it. Anything else (a 4xx,
  no completion stream, malformed chunks), or retries past the deadline, is an
  UpstreamError.
- Reasoning deltas (`reasoning_content`, as vLLM and DeepSeek send them) are
  wrapped in `<think>...</think>`, the form the API splits into `thinking` events.
- Tools: `tools`, `tool_choice`, `parallel_tool_calls` and the conversation's
  assistant `tool_calls` and `role: tool` messages pass through; the upstream
  picks and constrains the calls. Its tool-call deltas are gathered per `index`
  and each whole call is published as one piece in the generic form
  (`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, tools.py), the text
  the built-in engine's calls travel as: the API turns it into `tool_calls`
  exactly as for them. A call is published only once whole, so a takeover (or a
  retry) finds whole calls: it asks again and skips the answer's text and as many
  calls as were already published. Deltas without an index, a name or arguments
  that are not text, an undeclared name, or arguments over UPSTREAM_MAX_PIECE_CHARS
  are an UpstreamError (not retried).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Generator
from typing import Any, Literal

import openai

from textstream.config import Settings
from textstream.engines.base import TextStep, UpstreamError
from textstream.engines.upstream import (
    UpstreamOversizeError,
    UpstreamReader,
    UpstreamStalledError,
)
from textstream.job import LOWEST_LOGPROB, CompletionJob, PromptFormat, SamplingParams
from textstream.sources import ModelLoadError, OpenAISource
from textstream.tools import CALL_CLOSE, CALL_OPEN, MAX_TOOLS, functions_of

log = logging.getLogger(__name__)

#: Statuses worth retrying: the upstream is busy or broken for now.
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
#: How reasoning deltas are wrapped, as the API splits them into `thinking` events.
THINK_START, THINK_END = "<think>", "</think>"
#: When the upstream does not say, the context window assumed for its model.
UNKNOWN_WINDOW = 1 << 20


class OpenAIEngine:
    """A TextEngine (engines.base) backed by an OpenAI-compatible server."""

    produces_text: Literal[True] = True

    def __init__(self, source: OpenAISource, settings: Settings) -> None:
        started = time.perf_counter()
        self.source = source.shown_spec  # no credentials: /workers and the registry show it
        self.base_url = source.shown_url  # for logs; the client has the real one
        self.client = openai.OpenAI(
            base_url=source.base_url,
            api_key=settings.upstream_api_key or "none",
            max_retries=0,  # ours, with resume: the SDK's would double pieces
            timeout=openai.Timeout(settings.upstream_timeout, connect=10.0),
        )
        self.name, self.context_length = self._resolve_model(source.model)
        self.prompt_format: PromptFormat = settings.prompt_format
        self.device = source.shown_url
        self.peak_batch = 0
        self.backoff_cap = 8.0
        self.retry_seconds = settings.upstream_retry_seconds
        #: The longest the upstream may go without a chunk (comments do not count).
        self.stall_seconds = settings.upstream_timeout
        self.max_piece_chars = settings.upstream_max_piece_chars
        self.load_seconds = time.perf_counter() - started

    def _resolve_model(self, wanted: str) -> tuple[str, int]:
        """The upstream's model (its first, when none is named) and its window."""
        try:
            models = list(self.client.models.list())
        except openai.OpenAIError as exc:
            if wanted:  # serve anyway: the upstream may come up later
                log.warning("upstream %s did not list its models: %s", self.base_url, exc)
                return wanted, UNKNOWN_WINDOW
            raise ModelLoadError(f"upstream {self.base_url} does not answer: {exc}") from exc
        chosen = next((m for m in models if m.id == wanted), None) if wanted else None
        if chosen is None and not wanted and models:
            chosen = models[0]
        name = wanted or (chosen.id if chosen else "")
        if not name:
            raise ModelLoadError(f"upstream {self.base_url} serves no model")
        extra = (chosen.model_extra or {}) if chosen else {}
        return name, int(extra.get("max_model_len") or UNKNOWN_WINDOW)

    def start_batching(self) -> bool:
        return False  # each slot is its own upstream request; the upstream batches

    # -- generation ---------------------------------------------------------------

    def generate_text(
        self,
        job: CompletionJob,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        resume_text: str = "",
    ) -> Generator[TextStep]:
        """The upstream's pieces, never more than `params.max_new_tokens` of them in
        all (each retry asks only for what is left, and an upstream that ignores
        `max_tokens` is cut off: finish reason `length`)."""
        received, attempt, failing_since, pieces = "", 0, 0.0, 0
        deadline = job.deadline or (time.time() + 300)
        while not should_stop():  # cancelled (or past its deadline) between attempts
            before = pieces
            left = params.max_new_tokens - before
            if left <= 0:  # all asked for came, in attempts that each failed after
                yield TextStep("", "length", None)
                return
            asked = params.model_copy(update={"max_new_tokens": left}) if before else params
            finished, got, seen = False, "", 0
            try:
                with contextlib.closing(
                    self._stream(job, asked, should_stop, resume_text + received)
                ) as steps:
                    for step in steps:
                        seen += 1
                        # A piece of the upstream's text (not the `</think>` the relay
                        # adds when its reasoning ends with the stream).
                        counts = bool(step.text) and step.text != THINK_END
                        if counts and pieces >= params.max_new_tokens:
                            yield TextStep("", "length", None)  # it ignored max_tokens
                            return
                        pieces += counts
                        got += step.text
                        finished = finished or step.finish_reason is not None
                        usage = step.usage
                        if usage is not None and before:
                            # A retry's prompt held the text received before it, as a
                            # takeover's does (worker/completion.py counts alike).
                            usage = {
                                "prompt_tokens": max(0, usage["prompt_tokens"] - before),
                                "completion_tokens": before + usage["completion_tokens"],
                            }
                        yield TextStep(step.text, step.finish_reason, usage, step.logprobs)
                if finished or should_stop():
                    return
                if not seen:  # a 200 that held no completion chunk: an HTML page, JSON
                    empty = UpstreamMalformedError("the upstream's answer held no completion")
                    raise _Partial("", empty)
                # The stream ended with no finish reason: cut off (a proxy before a
                # dying upstream closes it so).
                raise _Partial(got, UpstreamTruncatedError("the upstream's stream ended early"))
            except _Partial as partial:
                if finished:  # what failed came after the end: the answer is whole
                    return
                received += got  # what this attempt delivered: the next goes on after it
                error = partial.error
                progressed = pieces > before
            now = time.time()
            # Failing since the last request that made progress.
            failing_since = now if progressed or not failing_since else failing_since
            # Give up before the job's deadline: the client hears why it ended.
            give_up = min(failing_since + self.retry_seconds, deadline - 1.0)
            if not self._retryable(error) or now >= give_up or should_stop():
                raise UpstreamError(f"{type(error).__name__}: {error}") from error
            attempt += 1
            delay = min(self.backoff_cap, 0.25 * 2**attempt)
            log.warning(
                "job=%s upstream failed (%s); retry %d in %.2fs",
                job.job_id,
                type(error).__name__,
                attempt,
                delay,
            )
            wake = time.time() + min(delay, max(0.0, give_up - time.time()))
            while time.time() < wake and not should_stop():  # a cancel cuts the wait
                time.sleep(min(0.1, max(0.0, wake - time.time())))

    @staticmethod
    def _retryable(error: Exception) -> bool:
        if isinstance(
            error, openai.APIConnectionError | UpstreamTruncatedError | UpstreamStalledError
        ):
            return True  # timeouts included
        if isinstance(error, openai.APIStatusError):
            return error.status_code in RETRYABLE_STATUS
        return False

    def _stream(
        self,
        job: CompletionJob,
        params: SamplingParams,
        should_stop: Callable[[], bool],
        resume: str,
    ) -> Generator[TextStep]:
        """One upstream request. A failure raises _Partial with what it received.
        It returns early once `should_stop()` is true, whatever the upstream is
        doing: the reader (upstream.py) closes the connection."""
        received = ""
        reader = UpstreamReader(
            lambda: self._open(job, params, resume),
            should_stop,
            stall_seconds=self.stall_seconds,
            # A piece's JSON: up to 6 bytes a character ("\\u00e9"), and the chunk around it.
            max_gap_bytes=6 * self.max_piece_chars + (64 << 10),
            name=f"upstream-{job.job_id[:8]}",
        )
        try:
            # Resumed inside the reasoning (a retry or takeover cut it short): it
            # goes on, without a second `<think>`.
            thinking = resume.rfind(THINK_START) > resume.rfind(THINK_END)
            calls = _ToolCalls(job, self.max_piece_chars, skip=resume.count(CALL_OPEN))
            for chunk in reader.chunks():
                logprobs = _logprobs_of(chunk) if params.logprobs is not None else None
                for reasoning, content, finish, usage, tool_deltas in self._deltas(chunk):
                    if max(len(reasoning), len(content)) > self.max_piece_chars:
                        raise UpstreamOversizeError(
                            f"the upstream sent a piece over {self.max_piece_chars} characters"
                        )
                    piece = ""
                    if reasoning:
                        piece = reasoning if thinking else THINK_START + reasoning
                        thinking = True
                    if calls.skip_text:  # a takeover's new answer: its text was sent
                        reasoning = content = ""
                    whole = calls.add(tool_deltas, finished=finish is not None)
                    if thinking and (content or finish or whole):
                        piece, thinking = piece + THINK_END, False
                    content += whole
                    # Text UTF-8 (so Redis) can hold: a lone surrogate from the
                    # upstream's JSON ("\\ud800") becomes "?".
                    piece = (piece + content).encode("utf-8", "replace").decode("utf-8")
                    received += piece
                    yield TextStep(piece, finish, usage, logprobs)
                    logprobs = None
                if should_stop():
                    return
        except (
            openai.OpenAIError,
            UpstreamStalledError,
            UpstreamOversizeError,
            UpstreamMalformedError,
        ) as exc:
            raise _Partial(received, exc) from exc
        except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
            # Not JSON, or not the shape of a completion chunk: an upstream_error
            # (not retried: a server that answers so will answer so again).
            malformed = UpstreamMalformedError(f"the upstream sent a malformed chunk ({exc})")
            raise _Partial(received, malformed) from exc
        finally:
            reader.close()  # cancel: the upstream sees the disconnect and stops

    def _open(self, job: CompletionJob, params: SamplingParams, resume: str) -> Any:
        """The upstream's streaming response (called on the reader's thread)."""
        try:
            return self._request(job, params, resume)
        except ValueError as exc:  # a request the SDK cannot even encode
            raise UpstreamMalformedError(type(exc).__name__) from exc

    def _request(self, job: CompletionJob, params: SamplingParams, resume: str) -> Any:
        # The SDK's timeouts are per read: capped at the job's deadline, so that a
        # request abandoned before the upstream answered (a cancel) holds its
        # connection no longer than the job could have lasted.
        left = job.deadline - time.time() if job.deadline else self.stall_seconds
        wait = max(1.0, min(self.stall_seconds, left + 1.0))
        common: dict[str, Any] = {
            "timeout": openai.Timeout(wait, connect=min(10.0, wait)),
            "model": self.name,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
        if params.stop:
            common["stop"] = params.stop
        if params.seed is not None:
            common["seed"] = params.seed
        extra: dict[str, Any] = {}
        if params.top_k > 0:
            extra["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
        if params.ignore_eos:
            extra["ignore_eos"] = True
        if params.json_schema is not None:
            # The upstream enforces it (strict, as here); in the body, as vLLM takes
            # it on /v1/completions too, where the SDK has no such argument.
            schema = {"name": "response", "schema": json.loads(params.json_schema), "strict": True}
            extra["response_format"] = {"type": "json_schema", "json_schema": schema}
        messages = job.messages
        fmt = self.prompt_format if job.prompt_format == "auto" else job.prompt_format
        if messages is None and fmt != "raw":
            messages = [{"role": "user", "content": job.prompt}]
        if params.logprobs is not None:  # relayed from its chunks (_logprobs_of)
            chat = {"logprobs": True, "top_logprobs": params.logprobs}
            common.update(chat if messages is not None else {"logprobs": params.logprobs})
        if messages is None:
            return self.client.completions.create(
                prompt=job.prompt + resume, extra_body=extra or None, **common
            )
        if job.tools:
            common["tools"] = job.tools
            if job.tool_choice is not None:
                common["tool_choice"] = job.tool_choice
            if job.parallel_tool_calls is not None:
                common["parallel_tool_calls"] = job.parallel_tool_calls
            if job.tool_choice not in (None, "auto", "none"):
                # params.json_schema is the forced call's (tools.call_schema): the
                # upstream forces the call itself.
                extra.pop("response_format", None)
        if resume and CALL_OPEN not in resume:
            messages = [*messages, {"role": "assistant", "content": resume}]
            extra.update(continue_final_message=True, add_generation_prompt=False)
        return self.client.chat.completions.create(
            messages=messages,  # type: ignore[arg-type]
            extra_body=extra or None,
            **common,
        )

    @staticmethod
    def _deltas(
        chunk: Any,
    ) -> Generator[tuple[str, str, str | None, dict[str, int] | None, list[Any]]]:
        """(reasoning text, answer text, finish_reason, usage, tool-call deltas) of
        one chunk."""
        usage = None
        if getattr(chunk, "usage", None) is not None:
            counts = (chunk.usage.prompt_tokens or 0, chunk.usage.completion_tokens or 0)
            # Taken only when plausible (they reach the client and /metrics): else
            # the worker counts the pieces itself.
            if all(isinstance(n, int) and 0 <= n < 1 << 31 for n in counts):
                usage = {"prompt_tokens": counts[0], "completion_tokens": counts[1]}
        if not chunk.choices:
            if usage is not None:
                yield "", "", None, usage, []
            return
        choice = chunk.choices[0]
        finish = _finish(choice.finish_reason)
        delta = getattr(choice, "delta", None)
        if delta is None:  # a completions chunk
            yield "", choice.text or "", finish, usage, []
            return
        reasoning = getattr(delta, "reasoning_content", None) or (
            (delta.model_extra or {}).get("reasoning_content") or ""
        )
        tool_deltas = getattr(delta, "tool_calls", None) or []
        if not isinstance(tool_deltas, list):
            raise UpstreamMalformedError("the upstream sent tool_calls that are not a list")
        yield reasoning, delta.content or "", finish, usage, tool_deltas


class _ToolCalls:
    """The upstream's tool-call deltas, gathered per `index` into whole calls,
    each published as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
    once the next call begins or the answer ends. After a takeover (`skip` calls
    already published), the new answer's text and first `skip` calls are dropped."""

    def __init__(self, job: CompletionJob, max_chars: int, skip: int) -> None:
        self.names = frozenset(f["name"] for f in functions_of(job.tools or []))
        self.max_chars = max_chars
        self.skip = skip
        #: A takeover in the calls: the new answer's text was published already.
        self.skip_text = skip > 0
        self.seen: set[int] = set()
        self.index: int | None = None
        self.name = ""
        self.arguments = ""

    def add(self, deltas: list[Any], finished: bool) -> str:
        """The text of the calls these deltas (and the answer's end) made whole."""
        out = ""
        for delta in deltas:
            index = _field(delta, "index")
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise UpstreamMalformedError("the upstream sent a tool call without an index")
            function = _field(delta, "function")
            name = _field(function, "name") if function is not None else None
            arguments = _field(function, "arguments") if function is not None else None
            if not isinstance(name, str | None) or not isinstance(arguments, str | None):
                raise UpstreamMalformedError("the upstream sent a tool call that is not text")
            if index != self.index:
                if index in self.seen:
                    raise UpstreamMalformedError("the upstream sent tool calls out of order")
                if len(self.seen) >= MAX_TOOLS:
                    raise UpstreamMalformedError(f"the upstream sent over {MAX_TOOLS} tool calls")
                out += self._whole()
                self.seen.add(index)
                self.index, self.name, self.arguments = index, "", ""
            if name and name != self.name:
                self.name += name
            self.arguments += arguments or ""
            if len(self.arguments) + len(self.name) > self.max_chars:
                raise UpstreamOversizeError(
                    f"the upstream sent a tool call over {self.max_chars} characters"
                )
        if finished:
            out += self._whole()
            self.index = None
        return out

    def _whole(self) -> str:
        if self.index is None:
            return ""
        if self.name not in self.names:
            raise UpstreamMalformedError("the upstream called a function that is not in tools")
        if self.skip:
            self.skip -= 1
            return ""
        arguments: Any = self.arguments or "{}"
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
        call = json.dumps({"name": self.name, "arguments": arguments}, ensure_ascii=False)
        self.index = None
        return CALL_OPEN + call + CALL_CLOSE


def _field(item: Any, key: str) -> Any:
    """A field of a chunk's part, as the SDK built it (an object) or left it (a dict)."""
    if isinstance(item, dict):
        return item.get(key)
    return getattr(item, key, None)


class UpstreamTruncatedError(Exception):
    """The upstream's stream ended without a finish reason: retried, as a dropped
    connection is."""


class UpstreamMalformedError(Exception):
    """The upstream answered with something that is not a completion stream."""


class _Partial(Exception):
    """An upstream request failed after yielding `text`."""

    def __init__(self, text: str, error: Exception) -> None:
        super().__init__(str(error))
        self.text = text
        self.error = error


def _logprobs_of(chunk: Any) -> list[list[Any]] | None:
    """The upstream chunk's logprobs as token events carry them (chat's `content`
    list, or completions' legacy lists); None when it sent none."""
    if not chunk.choices or getattr(chunk.choices[0], "logprobs", None) is None:
        return None
    got = chunk.choices[0].logprobs
    if getattr(got, "content", None) is not None:  # chat
        return [
            _entry(
                item.token,
                item.logprob,
                item.bytes,
                [_entry(t.token, t.logprob, t.bytes) for t in item.top_logprobs or []],
            )
            for item in got.content
        ]
    tokens, values = getattr(got, "tokens", None) or [], getattr(got, "token_logprobs", None) or []
    tops = getattr(got, "top_logprobs", None) or [None] * len(tokens)
    return [
        _entry(
            token,
            value,
            None,
            [_entry(t, v, None) for t, v in sorted((top or {}).items(), key=lambda kv: -kv[1])],
        )
        for token, value, top in zip(tokens, values, tops, strict=False)
    ]


def _entry(token: str, logprob: float | None, raw: list[int] | None, *top: Any) -> list[Any]:
    """One token's entry; its bytes only when its text does not hold them. A
    logprob JSON cannot carry or that is no logprob (null, NaN, -inf, > 0) is
    brought into [LOWEST_LOGPROB, 0]."""
    value = float(logprob) if logprob is not None else LOWEST_LOGPROB
    value = min(value, 0.0) if value >= LOWEST_LOGPROB else LOWEST_LOGPROB
    keep = raw is not None and raw != list(token.encode())
    return [token, round(value, 6), *top, *([raw] if keep else [])]


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
