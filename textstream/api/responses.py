"""How a submitted job is answered, for every route: as an SSE stream, or as one
JSON answer once the job has ended. Either way the request holds one of the
caller's stream slots (MAX_STREAMS_PER_KEY, taken by submit() or the events
route) per job until its answer ends."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from textstream.api.deps import services_of
from textstream.api.errors import JobNotFoundError
from textstream.api.relay.sse import Relay, collect_events
from textstream.api.security import Caller
from textstream.api.status import JobStatus, summarize
from textstream.api.submit import CancelPolicy, Submission, queue_hooks
from textstream.connections import UNREACHABLE
from textstream.transport.events import JobEvent


def job_headers(submission: Submission) -> dict[str, str]:
    return {"X-Job-Id": submission.job_id, "X-Cache": "hit" if submission.shared else "miss"}


def relay_for(
    request: Request,
    job_id: str,
    model: str,
    deadline: float | None,
    policy: CancelPolicy,
    first: JobEvent | None = None,
    grace: float = 0.0,
) -> Relay:
    """A relay of the job's stream; the client leaving cancels it under ON_DISCONNECT
    (after `grace` seconds nobody came back in). `first`: the new job's `queued`
    event, as its submission wrote it."""
    services = services_of(request)
    return Relay(
        services.jobs,
        services.settings,
        job_id,
        deadline,
        cancel_on_disconnect=policy is CancelPolicy.ON_DISCONNECT,
        queue=queue_hooks(services, model),
        first=first,
        grace=grace,
    )


async def release_slot(request: Request, slot: str | None) -> None:
    if slot is None:
        return
    caller: Caller = request.state.caller
    with anyio.CancelScope(shield=True), contextlib.suppress(*UNREACHABLE):
        await services_of(request).guard.close_stream(caller, slot)


async def sse_response(
    request: Request,
    events: AsyncIterator[bytes],
    headers: dict[str, str],
    *slots: str | None,
    sep: str | None = None,
) -> Response:
    """An SSE response that gives its stream slots back when it ends (one per job:
    a list of prompts on /v1/completions holds several). `sep`: the line end
    (sse-starlette's default is CRLF; /v1 sends LF, as OpenAI does)."""
    services = services_of(request)

    async def holding_slots() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        finally:
            for slot in slots:
                await release_slot(request, slot)

    response: Response = EventSourceResponse(
        holding_slots(),
        ping=services.settings.sse_ping_seconds,
        headers={**headers, "Cache-Control": "no-cache"},
        sep=sep,
    )
    return response


async def completed_job(
    request: Request, relay: Relay, slot: str | None, split_thinking: bool = True
) -> JobStatus | None:
    """Wait for the job to end (non-streaming answers); None if the client left."""
    try:
        events = await collect_events(relay, request.is_disconnected)
    finally:
        await release_slot(request, slot)
    if events is None:
        return None
    if not events:
        raise JobNotFoundError(relay.job_id)
    split = split_thinking and services_of(request).settings.thinking == "auto"
    return summarize(relay.job_id, events, split)
