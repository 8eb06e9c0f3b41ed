"""A job's status, folded from its event history (the stream is the only record).

queued -> running -> done | error | cancelled
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel

from textstream.api.relay.thinking import ThinkSplitter
from textstream.transport.events import ErrorType, EventType, JobEvent, entry_seconds

JobStatusName = Literal["queued", "running", "done", "error", "cancelled"]


class JobStatus(BaseModel):
    id: str
    status: JobStatusName
    text: str
    #: Reasoning the model wrote in a `<think>` block before its answer, if any.
    thinking: str | None = None
    created_at: float
    finish_reason: str | None = None
    model: str | None = None
    usage: dict[str, int] | None = None
    error: dict[str, Any] | None = None
    #: Its tokens' logprobs, as token events carry them (when the job asked).
    logprobs: list[list[Any]] | None = None
    #: How many times a worker took the job over after another one stopped.
    takeovers: int = 0
    last_event_id: str


def summarize(job_id: str, history: list[JobEvent], split_thinking: bool = True) -> JobStatus:
    """With `split_thinking`, a `<think>` block opening the text is `thinking`,
    apart from `text` (as the streams split it: relay/thinking.py). `history`
    may end with an error the relay made up (no id: Redis lost mid-answer); ids and
    times come from the stored events."""
    stored = [event.id for event in history if event.id]
    status: JobStatusName = "queued"
    summary: dict[str, Any] = {}
    for event in history:
        if event.event in (EventType.STARTED, EventType.RESUMED, EventType.TOKEN):
            status = "running"
        elif event.event == EventType.DONE:
            status = "done"
            summary.update(event.data)
        elif event.event == EventType.ERROR:
            summary["error"] = event.data.get("error")
            cancelled = (summary["error"] or {}).get("type") == ErrorType.CANCELLED
            status = "cancelled" if cancelled else "error"
    tokens = [e for e in history if e.event == EventType.TOKEN]
    raw = "".join(e.data["text"] for e in tokens)
    logprobs = [entry for e in tokens for entry in e.data.get("logprobs") or ()]
    text, thinking = raw, None
    if split_thinking:
        splitter = ThinkSplitter()
        pieces = splitter.feed(raw) + (splitter.flush() if status != "running" else [])
        text = "".join(t for kind, t in pieces if kind == "answer")
        thought = "".join(t for kind, t in pieces if kind == "thinking")
        thinking = thought or None
    return JobStatus(
        id=job_id,
        status=status,
        text=text,
        thinking=thinking,
        created_at=entry_seconds(stored[0]) if stored else time.time(),
        takeovers=sum(e.event == EventType.RESUMED for e in history),
        logprobs=logprobs or None,
        last_event_id=stored[-1] if stored else "",
        **summary,
    )
