"""The job stream contract: one Redis Stream per job, written by workers
(worker/writer.py), read by API processes (api/relay/). Both sides import this
module and scripts.py; neither imports the other.

Why Streams and not pub/sub: a reader that connects late, or reconnects, reads from
the id it last saw and misses nothing; the entry id doubles as the SSE `id:`.

Each entry has the fields `event` (the SSE event name), `data` (JSON text) and, on
token events, `ids`: the token ids whose text the event completes, from which a
worker taking over rebuilds the exact prefix. A token event's data may hold
`logprobs` beside its `text`. A `tokens` entry is a run of one job's consecutive
tokens written together (scripts.NewEvent): each token has an id of its own, the
run's first one the entry's, and parse_entry splits it, so readers, Last-Event-ID
and the SSE `id:` only ever see single `token` events.

Every write goes through one Lua script (scripts.APPEND_SCRIPT), so its rules hold
whoever writes: nothing after a terminal event; only the job's current owner
writes (a worker presumed dead is refused, "stolen"); each write returns the
cancel flag; a write sent twice lands once; TTLs are refreshed, so a job
disappears JOB_TTL after its last event. On a Redis Cluster every script touches
only one job's keys, in one slot (keys.job_tag).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from textstream.config import Settings
from textstream.transport.scripts import TERMINAL_EVENTS, EventType, as_text

__all__ = [
    "CANCELLED",
    "QUEUE_TIMEOUT",
    "REDIS_LOST",
    "START_ID",
    "TERMINAL_EVENTS",
    "TIMEOUT",
    "ErrorType",
    "EventType",
    "IdKey",
    "JobEvent",
    "WriteOutcome",
    "entry_seconds",
    "entry_span",
    "error_data",
    "id_key",
    "parse_entries",
    "parse_entry",
    "stream_maxlen",
]


START_ID = "0-0"

#: Events a job may produce besides its tokens (status, seams, terminal).
EXTRA_EVENTS = 64


def stream_maxlen(settings: Settings) -> int:
    """MAXLEN of a job's stream: room for every token event and the rest, so a
    reader that starts late still reads the whole job."""
    return settings.max_new_tokens_limit + EXTRA_EVENTS


class WriteOutcome(StrEnum):
    OK = "ok"
    CANCEL = "cancel"  # written; a stop was requested
    CLOSED = "closed"  # refused: the job already ended
    STOLEN = "stolen"  # refused: another worker owns the job now


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One entry of a job's stream. `id` is the Redis entry id ("ms-seq")."""

    id: str
    event: str
    data: dict[str, Any]
    token_ids: tuple[int, ...] = ()
    #: `data` as stored (JSON text), which the relay forwards without re-encoding.
    raw: str = ""

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


#: A stream id as (ms, seq), to compare ids in order.
IdKey = tuple[int, int]


def id_key(entry_id: bytes | str) -> IdKey:
    ms, _, seq = as_text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def entry_seconds(entry_id: str) -> float:
    """When an entry was written: a stream id is '<unix ms>-<seq>', on Redis's clock."""
    return int(entry_id.split("-", 1)[0]) / 1000


class ErrorType(StrEnum):
    """The `type` of an `error` event that ends a job (the API maps each to an HTTP
    status for an answer that was not streamed: api/errors.JOB_ERROR_STATUS)."""

    CANCELLED = "cancelled"
    TIMEOUT = "timeout"  # JOB_TIMEOUT
    QUEUE_TIMEOUT = "queue_timeout"  # no worker started it within its queue_timeout
    QUEUE_FULL = "queue_full"  # moved to a fallback whose queue was full
    NO_WORKER = "no_worker"
    SHUTDOWN = "shutdown"  # the API process (or `textstream serve`) is stopping
    REDIS_UNAVAILABLE = "redis_unavailable"
    PROMPT_TOO_LONG = "prompt_too_long"
    INVALID_RESPONSE_FORMAT = "invalid_response_format"
    INVALID_TOOLS = "invalid_tools"
    INVALID_LOGPROBS = "invalid_logprobs"
    GENERATION_FAILED = "generation_failed"
    UPSTREAM_ERROR = "upstream_error"


def error_data(error_type: str, message: str) -> dict[str, Any]:
    """An error's JSON: an `error` event's data, or an HTTP error body."""
    return {"error": {"type": str(error_type), "message": message}}


CANCELLED = error_data(ErrorType.CANCELLED, "the job was cancelled")
TIMEOUT = error_data(ErrorType.TIMEOUT, "the job did not finish within JOB_TIMEOUT")
QUEUE_TIMEOUT = error_data(
    ErrorType.QUEUE_TIMEOUT, "no worker started the job within its queue_timeout; it never ran"
)
REDIS_LOST = error_data(
    ErrorType.REDIS_UNAVAILABLE, "the event store is unreachable; reconnect later"
)


def parse_entry(raw_id: bytes | str, fields: dict[bytes, bytes] | list[bytes]) -> list[JobEvent]:
    """A stream entry's events, its fields as redis-py's dict or as Redis's flat
    list: one, or the tokens of a run (scripts.NewEvent), each with its own id."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    entry_id, event = as_text(raw_id), as_text(fields[b"event"])
    ids = fields.get(b"ids") or b""
    if event != EventType.TOKENS:
        raw = fields[b"data"].decode()
        return [JobEvent(entry_id, event, json.loads(raw), _token_ids(ids), raw)]
    texts, id_lists = fields[b"data"].decode().split("\n"), ids.split(b";")
    ms, first = id_key(entry_id)
    return [
        JobEvent(f"{ms}-{first + i}", EventType.TOKEN, json.loads(raw), _token_ids(token), raw)
        for i, (raw, token) in enumerate(zip(texts, id_lists, strict=True))
    ]


def entry_span(raw_id: bytes | str, fields: dict[bytes, bytes]) -> tuple[IdKey, IdKey]:
    """The ids of an entry's first and last event (they differ for a run of tokens),
    without decoding its data."""
    first = id_key(raw_id)
    if fields[b"event"] != EventType.TOKENS.encode():
        return first, first
    return first, (first[0], first[1] + fields[b"data"].count(b"\n"))


def _token_ids(ids: bytes) -> tuple[int, ...]:
    return tuple(int(i) for i in ids.split(b",")) if ids else ()


def parse_entries(entries: list[Any], after: str | None = None) -> list[JobEvent]:
    """The events of XRANGE/XREAD entries, only those after id `after` if given (a
    run's first tokens may come before it)."""
    events = [event for raw_id, fields in entries for event in parse_entry(raw_id, fields)]
    if after is None:
        return events
    start = id_key(after)
    return [event for event in events if id_key(event.id) > start]
