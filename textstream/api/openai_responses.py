"""OpenAI's Responses API: `/v1/responses` on the same jobs and streams as the
other routes. A response is a chat job (so every engine answers it, an upstream
relay through its chat completions); its id is `resp_<job id>`.

- `POST /v1/responses`: streamed (Responses events, response_events.py) or one
  response object. A foreground stream's job stops when its client leaves
  (ON_DISCONNECT, as /v1/chat/completions); `background=true` runs whether or not
  anyone reads (EXPLICIT, as POST /jobs) and answers at once, status `queued`.
- `GET /v1/responses/{id}`: the response as it stands; `?stream=true&starting_after=N`
  (background responses, as OpenAI's) resumes its events after N, from any API
  process: the events are derived again from the job's stored events, and their
  numbers with them. N past the last event: a finished response's stream ends at
  once, a running one's waits for events numbered above N.
- `POST /v1/responses/{id}/cancel` (background only, as OpenAI's) stops it at once
  and answers its state; a response that already ended answers its final state.
- `DELETE /v1/responses/{id}`: forgets it and its output (and stops it if it runs).

A response is another key's job (404, exactly as unknown) or stored (`store`,
conversations.py) for RESPONSES_TTL; `store=false` keeps nothing to retrieve.

No `from __future__ import annotations`: FastAPI reads these signatures at run time.
"""

import asyncio
import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from textstream.api.conversations import (
    StoredResponse,
    forget,
    job_id_of,
    load,
    save,
)
from textstream.api.deps import services_of
from textstream.api.edge import authorize
from textstream.api.errors import InvalidInputError, JobNotFoundError, job_error_response
from textstream.api.native import JOB_ID, splits
from textstream.api.protocol import Prompt
from textstream.api.relay.job_events import CancelOutcome, JobAccess
from textstream.api.relay.sse import collect_events, relay_events
from textstream.api.response_events import ResponseEvents, ResponseStream, fold
from textstream.api.responses import Hold, job_headers, relay_for
from textstream.api.responses_protocol import ResponsesRequest
from textstream.api.submit import CancelPolicy, Submission, check_access, job_deadline, submit
from textstream.transport.events import JobEvent

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

#: How long a cancel waits for the job's last event before answering its state.
CANCEL_WAIT_SECONDS = 5.0


class ResponseNotFoundError(JobNotFoundError):
    def __init__(self, response_id: str, field: str = "response_id") -> None:
        super().__init__()
        self.response_id, self.field = response_id, field

    def __str__(self) -> str:
        return f"no response with id {self.response_id!r} (unknown, deleted, or expired)"


@router.post("/responses")
async def create_response(request: Request, body: ResponsesRequest) -> Response:
    services, caller = services_of(request), request.state.caller
    body.refuse_unsupported()
    earlier = await conversation_before(request, body.previous_response_id)
    stored = StoredResponse(
        model=body.model or "",
        background=body.background,
        store=body.store,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        metadata=body.metadata or {},
        previous_response_id=body.previous_response_id,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        tool_choice=body.tool_choice if body.tool_choice is not None else "auto",
        tools=body.chat_tools()[0],
        text=body.text or {"format": {"type": "text"}},
        truncation=body.truncation or "disabled",
        messages=earlier + body.input_messages(),
    )
    tools, use, schema = body.tool_use()
    prompt = Prompt(
        "input",
        messages=stored.prompt_messages(),
        max_tokens_field="max_output_tokens",
        tools=tools,
        tool_use=use,
        tool_choice=_chat_choice(body.tool_choice),
        parallel_tool_calls=body.parallel_tool_calls,
    )
    generation = body.generation(services.settings.max_new_tokens_limit, json_schema=schema)
    policy = CancelPolicy.EXPLICIT if body.background else CancelPolicy.ON_DISCONNECT
    # A background stream holds a slot as /jobs/{id}/events does; taken first, so
    # that a refusal leaves no job running that nobody knows the id of.
    hold = await Hold.with_slot(request) if body.background and body.stream else Hold(request)
    async with hold:
        job = await submit(services, caller, prompt, generation, policy)
        relay = relay_for(request, job.job_id, job.model, job.deadline, policy, job.first)
        hold.add(relay, job.slot)  # from here a failure stops the job: nobody has its id
        stored.model = job.model
        if body.store:
            await save(services, job.job_id, stored)
        events = ResponseEvents(job.job_id, stored, splits(request))
        headers = job_headers(job)
        if body.stream:
            return hold.stream(relay_events(relay, ResponseStream(events)), headers, sep="\n")
        if body.background:
            if job.first is not None:
                events.feed(job.first)
            await hold.end()
            return JSONResponse(events.snapshot(), headers=headers)
        history = await hold.history(relay)
    return whole_response(request, job, events, history, headers)


def whole_response(
    request: Request,
    job: Submission,
    events: ResponseEvents,
    history: list[JobEvent] | None,
    headers: dict[str, str],
) -> Response:
    """A foreground response, not streamed: once its job has ended."""
    if history is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    if not history:
        raise JobNotFoundError(job.job_id)
    for event in history:
        events.feed(event)
    last = history[-1]
    if last.event != "done":  # the job failed, or the read did (Redis lost)
        return job_error_response(request, last.data.get("error"), headers)
    return JSONResponse(events.snapshot(), headers=headers)


def _chat_choice(choice: Any) -> Any:
    """A Responses `tool_choice` as chat's (an upstream engine passes it on)."""
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


async def conversation_before(
    request: Request, previous_response_id: str | None
) -> list[dict[str, Any]]:
    """The messages of the conversation a previous response ended: its own (its
    chain's and its input), then its answer: its text and its function calls."""
    if previous_response_id is None:
        return []
    field = "previous_response_id"
    job_id, stored, _ = await owned_response(request, previous_response_id, field)
    services = services_of(request)
    history = await services.jobs.history(job_id)
    if not history:
        raise ResponseNotFoundError(previous_response_id, field)
    previous = fold(job_id, stored, history, splits(request))
    if previous.status in ("queued", "in_progress"):
        raise InvalidInputError(field, "the previous response has not finished yet")
    answer: dict[str, Any] = {"role": "assistant", "content": previous.output_text}
    calls = [
        {
            "id": item["call_id"],
            "type": "function",
            "function": {"name": item["name"], "arguments": item["arguments"]},
        }
        for item in previous.output
        if item["type"] == "function_call"
    ]
    if calls:
        answer["tool_calls"] = calls
    return [*stored.messages, answer]


async def owned_response(
    request: Request, response_id: str, field: str = "response_id"
) -> tuple[str, StoredResponse, JobAccess]:
    """The caller's stored response; 404 for an unknown id or another key's, alike."""
    services, caller = services_of(request), request.state.caller
    job_id = job_id_of(response_id)
    if not JOB_ID.fullmatch(job_id):
        raise ResponseNotFoundError(response_id, field)
    try:
        access = await check_access(services, caller, job_id, own=True)
    except JobNotFoundError:
        raise ResponseNotFoundError(response_id, field) from None
    stored = await load(services, job_id)
    if stored is None:
        raise ResponseNotFoundError(response_id, field)
    return job_id, stored, access


@router.get("/responses/{response_id}")
async def retrieve_response(
    request: Request,
    response_id: str,
    stream: bool = False,
    starting_after: Annotated[int | None, Query()] = None,
    include: Annotated[list[str] | None, Query(alias="include[]")] = None,
) -> Response:
    services = services_of(request)
    if starting_after is not None and starting_after < 0:
        raise InvalidInputError("starting_after", "starting_after must be 0 or more")
    if include:
        raise InvalidInputError("include", "include values are not supported")
    job_id, stored, access = await owned_response(request, response_id)
    if not stream:
        history = await services.jobs.history(job_id)
        if not history:
            raise ResponseNotFoundError(response_id)
        return JSONResponse(fold(job_id, stored, history, splits(request)).snapshot())
    if not stored.background:
        raise InvalidInputError("stream", "only background responses can be streamed again")
    deadline = await job_deadline(services, job_id)
    hold = await Hold.with_slot(request)
    relay = relay_for(request, job_id, access.model, deadline, CancelPolicy.EXPLICIT)
    after = -1 if starting_after is None else starting_after
    converter = ResponseStream(ResponseEvents(job_id, stored, splits(request)), after)
    chunks = relay_events(relay, converter)
    return hold.stream(chunks, {"X-Job-Id": job_id}, sep="\n")


@router.post("/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> Response:
    """Stop a background response (within one decode step), and answer its state
    once its job has ended (or CANCEL_WAIT_SECONDS passed): `cancelled`, or the
    final state of one that ended first."""
    services = services_of(request)
    job_id, stored, access = await owned_response(request, response_id)
    if not stored.background:
        raise InvalidInputError("response_id", "only background responses can be cancelled")
    outcome = await services.jobs.cancel(job_id)
    if outcome is CancelOutcome.UNKNOWN:
        raise ResponseNotFoundError(response_id)
    if outcome is CancelOutcome.CANCELLED:
        await services.queue.withdraw(job_id, access.model)  # never claimed: off the queue
    log.info("job=%s response cancel: %s", job_id, outcome.value)
    history = await history_once_ended(request, job_id, access.model)
    return JSONResponse(fold(job_id, stored, history, splits(request)).snapshot())


async def history_once_ended(request: Request, job_id: str, model: str) -> list[JobEvent]:
    services = services_of(request)
    relay = relay_for(request, job_id, model, None, CancelPolicy.EXPLICIT)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CANCEL_WAIT_SECONDS):
            events = await collect_events(relay, request.is_disconnected)
            if events and events[-1].id:
                return events
    return await services.jobs.history(job_id)


@router.delete("/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    """Forget the response, and its output: the job's events go too once it has
    ended (a running one is stopped, and its events expire JOB_TTL after its end)."""
    services = services_of(request)
    job_id, _, access = await owned_response(request, response_id)
    await forget(services, job_id)
    outcome = await services.jobs.cancel(job_id)
    if outcome is CancelOutcome.CANCELLED:
        await services.queue.withdraw(job_id, access.model)  # never claimed: off the queue
    if outcome in (CancelOutcome.CANCELLED, CancelOutcome.FINISHED):
        await services.jobs.discard(job_id)
    log.info("job=%s response deleted (%s)", job_id, outcome.value)
    return {"id": response_id, "object": "response", "deleted": True}
