"""HTTP routes: `/completion/{question}`, the `/jobs` API and `/health`.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.convertors import Convertor, register_url_convertor

from textstream.events import START_ID, CancelOutcome
from textstream.jobs import JobStatus, summarize
from textstream.ops import authorize, services_of
from textstream.schemas import CompletionQuery, JobRequest
from textstream.security import Caller
from textstream.service import (
    InvalidInputError,
    JobNotFoundError,
    Submission,
    check_context_window,
    check_prompt,
    check_request,
    job_deadline,
    start_job,
)
from textstream.sse import Relay, collect_events, stream_job_events


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

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
JobId = Annotated[str, Path(description="a job id, as returned by POST /jobs or X-Job-Id")]


def job_headers(submission: Submission) -> dict[str, str]:
    return {"X-Job-Id": submission.job_id, "X-Cache": "hit" if submission.shared else "miss"}


async def sse_response(
    request: Request, events: AsyncIterator[bytes], headers: dict[str, str]
) -> Response:
    """An SSE response holding one of the caller's stream slots until it ends."""
    services = services_of(request)
    caller: Caller = request.state.caller
    slot = await services.guard.open_stream(caller)

    async def holding_slot() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        finally:
            with anyio.CancelScope(shield=True):
                await services.guard.close_stream(caller, slot)

    response: Response = EventSourceResponse(
        holding_slot(),
        ping=services.settings.sse_ping_seconds,
        headers={**headers, "Cache-Control": "no-cache"},
    )
    return response


#: Status codes for a job that ended in error, when the answer is not streamed.
ERROR_STATUS = {
    "prompt_too_long": 422,
    "cancelled": 409,
    "timeout": 504,
    "generation_failed": 502,
    "redis_unavailable": 503,
}


async def completed_job(request: Request, relay: Relay) -> JobStatus | None:
    """Wait for the job to end (non-streaming answers); None if the client left."""
    events = await collect_events(relay, request.is_disconnected)
    if events is None:
        return None
    if not events:
        raise JobNotFoundError(relay.job_id)
    return summarize(relay.job_id, events)


def job_error(status: JobStatus) -> tuple[dict[str, Any], int]:
    """The error a failed job ended with, and the HTTP status it answers with."""
    error = status.error or {"type": "error", "message": "the job failed"}
    return error, ERROR_STATUS.get(error["type"], 502)


def error_response(status: JobStatus, headers: dict[str, str]) -> JSONResponse:
    error, code = job_error(status)
    return JSONResponse({"error": error}, code, headers=headers)


def path_text(request: Request) -> str:
    """The raw path must be UTF-8 once percent-decoded (Starlette would replace bad bytes)."""
    try:
        return unquote_to_bytes(request.scope.get("raw_path", b"")).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError("question", "the path is not valid UTF-8") from None


@router.get("/completion/{question:text}", response_class=EventSourceResponse)
async def completion(
    request: Request,
    question: Annotated[str, Path(description="the prompt, URL-encoded")],
    params: Annotated[CompletionQuery, Query()],
) -> Response:
    """Stream a completion of `question` as SSE: `token` events, then `done` or `error`
    (`stream=false`: one JSON answer once done). Disconnecting cancels the job."""
    services = services_of(request)
    path_text(request)
    check_prompt(question, services.settings, "question")
    check_request(params, services.settings)
    await check_context_window(services, question, params, "question")
    job = await start_job(services, params, prompt=question, reader=True)
    relay = Relay(services.jobs, services.settings, job.job_id, job.deadline, True)
    headers = job_headers(job)
    if params.stream:
        return await sse_response(request, stream_job_events(relay), headers)
    status = await completed_job(request, relay)
    if status is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    if status.status != "done":
        return error_response(status, headers)
    body = {
        "id": job.job_id,
        "model": status.model,
        "text": status.text,
        "finish_reason": status.finish_reason,
        "usage": status.usage,
    }
    return JSONResponse(body, headers=headers)


@router.post("/jobs", status_code=202)
async def create_job(request: Request, body: JobRequest) -> dict[str, str | None]:
    """Queue a completion; follow it at `events_url` (resumable), poll `status_url`."""
    services = services_of(request)
    check_prompt(body.prompt, services.settings, "prompt")
    check_request(body, services.settings)
    await check_context_window(services, body.prompt, body, "prompt")
    job = await start_job(services, body, prompt=body.prompt, reader=False, pinned=True)
    return {
        "id": job.job_id,
        "events_url": f"/jobs/{job.job_id}/events",
        "status_url": f"/jobs/{job.job_id}",
        # For a browser EventSource, which cannot send Authorization (None when open).
        "events_token": services.guard.stream_token(job.job_id, request.state.caller),
    }


def checked_job_id(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise JobNotFoundError(job_id)
    return job_id


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    request: Request,
    job_id: JobId,
    last_event_id: Annotated[str | None, Query(description="resume after this event")] = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """The job's events as SSE, from the start or after `Last-Event-ID` (header, as a
    browser EventSource sends on reconnect, or query). Leaving does not cancel."""
    services = services_of(request)
    after = last_event_id_header or last_event_id or START_ID
    if not EVENT_ID.match(after):
        raise InvalidInputError("last_event_id", "expected an event id such as 1700000000000-0")
    deadline = await job_deadline(services, checked_job_id(job_id))
    relay = Relay(services.jobs, services.settings, job_id, deadline, cancel_on_disconnect=False)
    return await sse_response(request, stream_job_events(relay, after), {"X-Job-Id": job_id})


@router.get("/jobs/{job_id}")
async def job_status(request: Request, job_id: JobId) -> JobStatus:
    """Status, text so far, usage."""
    history = await services_of(request).jobs.history(checked_job_id(job_id))
    if not history:
        raise JobNotFoundError(job_id)
    return summarize(job_id, history)


@router.delete("/jobs/{job_id}", status_code=202)
async def cancel_job(request: Request, job_id: JobId) -> dict[str, str]:
    """Cancel a queued or running job. A queued job ends at once and is never
    generated; a running one stops within one decode step."""
    outcome = await services_of(request).jobs.cancel(checked_job_id(job_id))
    if outcome is CancelOutcome.UNKNOWN:
        raise JobNotFoundError(job_id)
    if outcome is CancelOutcome.FINISHED:
        raise HTTPException(
            409, detail={"error": {"type": "job_finished", "message": "the job already ended"}}
        )
    return {"id": job_id, "status": outcome.value}
