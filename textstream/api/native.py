"""The native API: `/completion/{question}` and the `/jobs` API.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import re
from typing import Annotated
from urllib.parse import unquote_to_bytes

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.convertors import Convertor, register_url_convertor

from textstream.api.deps import services_of
from textstream.api.edge import authorize
from textstream.api.errors import (
    BadEventIdError,
    InvalidInputError,
    JobFinishedError,
    JobNotFoundError,
    job_error_response,
)
from textstream.api.protocol import CompletionQuery, JobRequest, Prompt
from textstream.api.relay.job_events import CancelOutcome, ResumePoint
from textstream.api.relay.sse import stream_job_events
from textstream.api.responses import Hold, job_headers, relay_for
from textstream.api.status import JobStatus, summarize
from textstream.api.submit import CancelPolicy, check_access, job_deadline, submit
from textstream.transport.events import START_ID


class AnyTextConvertor(Convertor[str]):
    """Like Starlette's `path` convertor, but also matching newlines (`.` does not),
    so `/completion/line%0Abreak` reaches the route and gets a clear 422."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("text", AnyTextConvertor())
router = APIRouter(dependencies=[Depends(authorize)])

JOB_ID = re.compile(r"[0-9a-f]{32}")
#: A Redis stream id: two unsigned 64-bit integers, in ASCII digits.
EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
JobId = Annotated[str, Path(description="a job id, as returned by POST /jobs or X-Job-Id")]


def splits(request: Request) -> bool:
    """Whether a think block streams apart from the answer (THINKING)."""
    return services_of(request).settings.thinking == "auto"


def path_text(request: Request) -> str:
    """The raw path must be UTF-8 once percent-decoded (Starlette would replace bad bytes)."""
    try:
        return unquote_to_bytes(request.scope.get("raw_path", b"")).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("question", "the path is not valid UTF-8") from None


@router.get("/completion", include_in_schema=False)
async def completion_without_question() -> Response:
    """`/completion` with no question, as clients send `/completion/.` once they
    resolve the dot segment (RFC 3986; httpx, browsers, curl): a clear 422 rather
    than Starlette's redirect to `/completion/`."""
    raise InvalidInputError(
        "question", "no question after /completion/ (a lone '.' or '..' must be sent as %2E)"
    )


@router.get("/completion/{question:text}", response_class=EventSourceResponse)
async def completion(
    request: Request,
    question: Annotated[str, Path(description="the prompt, URL-encoded")],
    params: Annotated[CompletionQuery, Query()],
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """Stream a completion of `question` as SSE: `token` events, then `done` or `error`
    (`stream=false`: one JSON answer once done).

    Event ids name the job (`<job id>:<event id>`). A browser EventSource reconnects
    to this URL with Last-Event-ID whenever its connection drops, and also once the
    stream has ended: it gets the rest of that very job, on any API process, or 204
    (EventSource then stops) if the job ended there. A client that drops has
    RECONNECT_GRACE_SECONDS to come back before its job is cancelled."""
    path_text(request)
    after = START_ID
    if last_event_id_header is not None and params.stream:
        job_id, after = checked_completion_event_id(last_event_id_header)
        if job_id is not None:
            rejoined = await rejoin(request, job_id, after)
            if rejoined is not None:
                return rejoined
            after = START_ID  # that job is gone (expired, lost) or not the caller's
    policy = CancelPolicy.ON_DISCONNECT
    services = services_of(request)
    job = await submit(services, request.state.caller, Prompt("question", question), params, policy)
    grace = services.settings.reconnect_grace_seconds if params.stream else 0.0
    relay = relay_for(request, job.job_id, job.model, job.deadline, policy, job.first, grace)
    headers = job_headers(job)
    async with Hold(request, [relay], [job.slot]) as hold:
        if job.shared and after != START_ID:
            # A bare event id (no job in it): resumed only if the cache answers with
            # a job that has that event.
            point = await services.jobs.resume_point(job.job_id, after)
        else:
            point = ResumePoint.UNKNOWN  # a new job: its events start after no one's id
        if point is ResumePoint.ENDED:
            await hold.end()
            return Response(status_code=204, headers=headers)
        if params.stream:
            start = after if point is ResumePoint.OPEN else START_ID
            events = stream_job_events(relay, start, splits(request), named=True)
            return hold.stream(events, headers)
        status = await hold.completed()
    if status is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    if status.status != "done":
        return job_error_response(request, status.error, headers)
    body = {
        "id": job.job_id,
        "model": status.model,
        "text": status.text,
        **({"thinking": status.thinking} if status.thinking else {}),
        "finish_reason": status.finish_reason,
        "usage": status.usage,
    }
    return JSONResponse(body, headers=headers)


async def rejoin(request: Request, job_id: str, after: str) -> Response | None:
    """A /completion client back with the Last-Event-ID of its job: the rest of that
    job (it takes a reader's claim of its own before the one its drop left behind
    lapses, so the job goes on), or 204 if the job ended there. None when the job
    is not there for this caller (expired, lost with Redis's data, another key's:
    all look alike), and the request is then answered as a new one."""
    services = services_of(request)
    caller = request.state.caller
    try:
        access = await check_access(services, caller, job_id)
        deadline = await job_deadline(services, job_id)
    except JobNotFoundError:
        return None
    headers = {"X-Job-Id": job_id}
    point = await services.jobs.resume_point(job_id, after)
    if point is ResumePoint.UNKNOWN:
        raise BadEventIdError(
            "Last-Event-ID", f"Last-Event-ID: {after} is not an event of job {job_id}"
        )
    if point is ResumePoint.ENDED:
        return Response(status_code=204, headers=headers)
    async with await Hold.with_slot(request) as hold:
        await services.jobs.track(job_id, reader=True)
        policy, grace = CancelPolicy.ON_DISCONNECT, services.settings.reconnect_grace_seconds
        relay = relay_for(request, job_id, access.model, deadline, policy, grace=grace)
        events = stream_job_events(relay, after, splits(request), named=True)
        return hold.stream(events, headers)


@router.post("/jobs", status_code=202)
async def create_job(request: Request, body: JobRequest) -> dict[str, str | None]:
    """Queue a completion; follow it at `events_url` (resumable), poll `status_url`."""
    services = services_of(request)
    caller = request.state.caller
    job = await submit(services, caller, body.as_prompt(), body, CancelPolicy.EXPLICIT)
    return {
        "id": job.job_id,
        "events_url": f"/jobs/{job.job_id}/events",
        "status_url": f"/jobs/{job.job_id}",
        # For a browser EventSource, which cannot send Authorization (None when open).
        "events_token": services.guard.stream_token(job.job_id, caller),
    }


def checked_completion_event_id(value: str) -> tuple[str | None, str]:
    """A /completion Last-Event-ID: `<job id>:<event id>` (what its events carry), or
    a bare event id (streams before ids named their job)."""
    job_id, colon, event_id = value.rpartition(":")
    if not colon:
        return None, checked_event_id(value, "Last-Event-ID")
    if not JOB_ID.fullmatch(job_id):
        raise BadEventIdError("Last-Event-ID", "Last-Event-ID must be an id this stream sent")
    return job_id, checked_event_id(event_id, "Last-Event-ID")


def checked_event_id(value: str, field: str) -> str:
    match = EVENT_ID.fullmatch(value)
    if match is None or max(int(match[1]), int(match[2])) >= 2**64:
        raise BadEventIdError(field, f"{field} must be an event id such as 1700000000000-0")
    # As Redis writes it: 0017-0 names the event 17-0, and resuming after it must
    # not send that event again.
    return f"{int(match[1])}-{int(match[2])}"


def checked_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise JobNotFoundError(job_id)
    return job_id


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    request: Request,
    job_id: JobId,
    last_event_id: Annotated[str | None, Query(description="resume after this event")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    """The job's events as SSE, from the start or after `Last-Event-ID` (header, as a
    browser EventSource sends on reconnect, or query). Leaving does not cancel."""
    services = services_of(request)
    field = "Last-Event-ID" if last_event_id_header else "last_event_id"
    after = checked_event_id(last_event_id_header or last_event_id or START_ID, field)
    access = await check_access(services, request.state.caller, checked_job_id(job_id))
    deadline = await job_deadline(services, job_id)
    point = ResumePoint.OPEN
    if after != START_ID:
        point = await services.jobs.resume_point(job_id, after)
    if point is ResumePoint.UNKNOWN:
        raise BadEventIdError(field, f"{field} {after} is not an event of this job")
    if point is ResumePoint.ENDED:
        # Nothing will come: 204 tells a browser EventSource to stop reconnecting.
        return Response(status_code=204, headers={"X-Job-Id": job_id})
    hold = await Hold.with_slot(request)
    relay = relay_for(request, job_id, access.model, deadline, CancelPolicy.EXPLICIT)
    events = stream_job_events(relay, after, splits(request))
    return hold.stream(events, {"X-Job-Id": job_id})


@router.get("/jobs/{job_id}")
async def job_status(request: Request, job_id: JobId) -> JobStatus:
    """Status, text so far, usage."""
    services = services_of(request)
    await check_access(services, request.state.caller, checked_job_id(job_id))
    history = await services.jobs.history(job_id)
    if not history:
        raise JobNotFoundError(job_id)
    return summarize(job_id, history, splits(request))


@router.delete("/jobs/{job_id}", status_code=202)
async def cancel_job(request: Request, job_id: JobId) -> dict[str, str]:
    """Cancel a queued or running job. A queued job ends at once and is never
    generated; a running one stops within one decode step."""
    services = services_of(request)
    access = await check_access(services, request.state.caller, checked_job_id(job_id), own=True)
    outcome = await services.jobs.cancel(job_id)
    if outcome is CancelOutcome.UNKNOWN:
        raise JobNotFoundError(job_id)
    if outcome is CancelOutcome.FINISHED:
        raise JobFinishedError()
    if outcome is CancelOutcome.CANCELLED:
        await services.queue.withdraw(job_id, access.model)  # never claimed: off the queue
    return {"id": job_id, "status": outcome.value}
