"""A job's events as OpenAI Responses API events, and the response object they build.

The Responses events are a function of the job's stored events alone (and of the
stored request, conversations.py): `ResponseEvents` fed the job's history from its
start gives the same events with the same `sequence_number`s in any API process, at
any time. That is how a stream resumes (`starting_after=N`): the events are derived
again from the start and those numbered N or less are skipped. Status events the
relay makes up (queue positions) are not stored and make no Responses event; an
error the relay makes up (Redis lost, this process stopping: the job goes on) is an
`error` event that repeats the number of the event before it, so that a client
resuming after the last number it saw loses nothing.

One job event gives:

- `queued` (the first): `response.created` (status `queued` for a background
  response, `in_progress` otherwise: OpenAI's never shows a foreground one queued);
- `started` (or the first token): `response.in_progress`;
- text: with THINKING=auto, a leading `<think>` block is a `reasoning` output item
  (`response.reasoning_text.delta`/`.done`), the rest a `message` item
  (`output_item.added`, `content_part.added`, `output_text.delta`...);
- with tools: answer text from where a call may begin is held (tools.CallBuffer);
  at `done` it becomes `function_call` items (`output_item.added`,
  `function_call_arguments.delta` with the whole arguments, `.done`,
  `output_item.done`), or text if it did not parse into calls. Their ids are
  made from the job's id and the call's place, so that every process derives
  the same ones;
- `done`: the items closed, then `response.completed`, or `response.incomplete`
  (`incomplete_details.reason = "max_output_tokens"`) if it stopped at its limit;
- `error`: `response.failed` with `response.error`. A cancelled response ends with
  `response.failed` too, its status `cancelled` (the SDK knows no cancelled event).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sse_starlette import ServerSentEvent

from textstream.api.conversations import StoredResponse, response_id
from textstream.api.relay.thinking import ThinkSplitter
from textstream.tools import CallBuffer
from textstream.transport.events import ErrorType, EventType, JobEvent, entry_seconds

#: Our job error types as the codes of a Responses `error` object (ResponseError).
ERROR_CODES = {"prompt_too_long": "invalid_prompt"}


class ResponseEvents:
    """Job events in, Responses events (dicts with their sequence numbers) out, and
    the response object as it stands (`snapshot`)."""

    def __init__(self, job_id: str, stored: StoredResponse, split_thinking: bool) -> None:
        self.job_id = job_id
        self.stored = stored
        self.splitter = ThinkSplitter() if split_thinking else None
        use = stored.tool_use()
        self.calls = CallBuffer(use) if use is not None else None
        self.sequence = 0
        self.created_at = 0.0
        self.status = "queued" if stored.background else "in_progress"
        self.started = False
        self.output: list[dict[str, Any]] = []
        #: The item text is going to: "reasoning", "message", or None (none open).
        self.open: str | None = None
        self.error: dict[str, str] | None = None
        self.incomplete: dict[str, str] | None = None
        self.usage: dict[str, Any] | None = None

    # -- the response object ---------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        echo = self.stored.echo()
        return {
            "id": response_id(self.job_id),
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "output": json.loads(json.dumps(self.output)),  # a copy, as it is now
            "usage": self.usage,
            "reasoning": None,
            "user": None,
            **echo,
        }

    @property
    def output_text(self) -> str:
        """The answer (what a later turn's conversation carries)."""
        return "".join(
            part["text"]
            for item in self.output
            if item["type"] == "message"
            for part in item["content"]
        )

    # -- events ----------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _response_event(self, kind: str) -> dict[str, Any]:
        return self._event(kind, response=self.snapshot())

    def feed(self, event: JobEvent) -> list[dict[str, Any]]:
        """The Responses events one job event makes."""
        if not event.id:  # made up by the relay: not stored, not numbered
            if not event.terminal:
                return []
            error = event.data.get("error") or {}
            return [
                {
                    "type": "error",
                    "sequence_number": max(self.sequence - 1, 0),
                    "code": error.get("type", "error"),
                    "message": error.get("message", ""),
                    "param": None,
                }
            ]
        if event.event == EventType.QUEUED:
            if self.created_at:
                return []  # a stream holds one `queued` event; never two `created`
            self.created_at = entry_seconds(event.id)
            return [self._response_event("response.created")]
        out = self._start() if event.event != EventType.ERROR else []
        if event.event == EventType.TOKEN:
            text = event.data["text"]
            pieces = [("answer", text)] if self.splitter is None else self.splitter.feed(text)
            out += self._pieces(pieces)
        elif event.event == EventType.DONE:
            out += self._done(event.data)
        elif event.event == EventType.ERROR:
            out += self._failed(event.data.get("error") or {})
        return out

    def _start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started, self.status = True, "in_progress"
        return [self._response_event("response.in_progress")]

    def _pieces(self, pieces: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for kind, text in pieces:
            wanted = "reasoning" if kind == "thinking" else "message"
            if wanted == "message" and self.calls is not None:
                text = self.calls.feed(text)  # held back from where a call may begin
            if not text:
                continue
            if self.open != wanted:
                out += self._close("completed") + self._open(wanted)
            item = self.output[-1]
            item["content"][0]["text"] += text
            delta = "response.reasoning_text.delta" if wanted == "reasoning" else None
            out.append(
                self._event(
                    delta or "response.output_text.delta",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=text,
                    **({} if delta else {"logprobs": []}),
                )
            )
        return out

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item: dict[str, Any] = {"id": f"rs_{self.job_id}", "type": "reasoning", "summary": []}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": f"msg_{self.job_id}", "type": "message", "role": "assistant"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        added = self._event(
            "response.output_item.added",
            output_index=len(self.output),
            item={**item, "content": [], "status": "in_progress"},
        )
        self.output.append({**item, "content": [part], "status": "in_progress"})
        self.open = kind
        part_added = self._event(
            "response.content_part.added",
            item_id=item["id"],
            output_index=len(self.output) - 1,
            content_index=0,
            part=dict(part),
        )
        return [added, part_added]

    def _close(self, status: str) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        item, index = self.output[-1], len(self.output) - 1
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if self.open == "reasoning":
            done = [self._event("response.reasoning_text.done", **where, text=part["text"])]
        else:
            done = [
                self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
            ]
        done.append(self._event("response.content_part.done", **where, part=dict(part)))
        item["status"] = status
        done.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        self.open = None
        return done

    def _held(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the events of text still held, the calls it parsed into)."""
        out = self._pieces(self.splitter.flush()) if self.splitter is not None else []
        if self.calls is None:
            return out, []
        text, calls = self.calls.finish()
        self.calls = None
        return out + self._pieces([("answer", text)]), calls or []

    def _function_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = self._close("completed")
        for number, call in enumerate(calls):
            index, arguments = len(self.output), call["function"]["arguments"]
            item = {
                "id": f"fc_{self.job_id}_{number}",
                "type": "function_call",
                "call_id": f"call_{self.job_id}_{number}",
                "name": call["function"]["name"],
                "arguments": "",
                "status": "in_progress",
            }
            out.append(self._event("response.output_item.added", output_index=index, item=item))
            where = {"item_id": item["id"], "output_index": index}
            out.append(
                self._event("response.function_call_arguments.delta", **where, delta=arguments)
            )
            out.append(
                self._event("response.function_call_arguments.done", **where, arguments=arguments)
            )
            item = {**item, "arguments": arguments, "status": "completed"}
            self.output.append(item)
            out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _done(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        out, calls = self._held()
        if calls:
            out += self._function_calls(calls)
        elif not any(item["type"] == "message" for item in self.output):
            out += self._close("completed") + self._open("message")  # an empty answer
        length = data.get("finish_reason") == "length" and not calls
        out += self._close("incomplete" if length else "completed")
        usage = data.get("usage") or {}
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        self.usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        if length:
            self.status, self.incomplete = "incomplete", {"reason": "max_output_tokens"}
            return [*out, self._response_event("response.incomplete")]
        self.status = "completed"
        return [*out, self._response_event("response.completed")]

    def _failed(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        out, _ = self._held()  # what was held is text: an unfinished call is none
        out += self._close("incomplete")
        if error.get("type") == ErrorType.CANCELLED:
            self.status = "cancelled"
        else:
            self.status = "failed"
            code = ERROR_CODES.get(error.get("type", ""), "server_error")
            self.error = {"code": code, "message": error.get("message", "")}
        return [*out, self._response_event("response.failed")]


class ResponseStream:
    """The relay's converter (relay/sse.py): Responses events as SSE, those
    numbered `starting_after` or less left out (a resumed stream: see the module)."""

    def __init__(self, events: ResponseEvents, starting_after: int = -1) -> None:
        self.events = events
        self.starting_after = starting_after

    def catch_up(self, events: list[JobEvent]) -> None:
        for event in events:  # never called: a resumed stream reads from the start
            self.events.feed(event)

    def convert(self, event: JobEvent) -> Iterable[ServerSentEvent]:
        return [
            ServerSentEvent(data=json.dumps(item, ensure_ascii=False), event=item["type"], sep="\n")
            for item in self.events.feed(event)
            if item["sequence_number"] > self.starting_after or item["type"] == "error"
        ]


def fold(
    job_id: str, stored: StoredResponse, history: list[JobEvent], split: bool
) -> ResponseEvents:
    """The response as the job's events so far make it."""
    events = ResponseEvents(job_id, stored, split)
    for event in history:
        events.feed(event)
    return events
