"""How a submitted job is answered, for every route: as an SSE stream, or as one
JSON answer once the job has ended.

One owner per request's lifetime: a `Hold` holds what the request took on its
jobs' behalf (one of the caller's stream slots per job, MAX_STREAMS_PER_KEY, taken
by submit() or an events route; the relays of the jobs it started) from the
moment it has them until its answer ends. A route opens one and does one of:
- hands it to its answer (`stream`, `completed`): the answer gives it back when
  it ends, the client leaving included;
- `end()`s it (an answer that needs no job, as a 204): slots back, jobs left be;
- leaves its `async with` block by an exception (Redis failing, the client gone,
  a refusal): slots back, and the jobs it started released, which stops each
  unless another reader shares it, and takes it off the queue if no worker has
  it yet (relay/sse.release).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import anyio
from fastapi import Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse

from textstream.api.deps import services_of
from textstream.api.errors import JobNotFoundError
from textstream.api.relay.sse import Relay, collect_events, release, stop
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


class Hold:
    """What one request holds until its answer ends (see the module docstring).
    `relays`: the jobs this request started, released if it fails before its
    answer; `slots`: the caller's stream slots it took, one per job."""

    def __init__(
        self, request: Request, relays: Sequence[Relay] = (), slots: Sequence[str | None] = ()
    ) -> None:
        self._request = request
        self.relays = list(relays)
        self.slots = list(slots)
        self._handed = False

    @classmethod
    async def with_slot(cls, request: Request) -> Hold:
        """A Hold on a new stream slot of the caller's, for a route that follows a job
        it did not start (an events route, a resumed stream); 429 past
        MAX_STREAMS_PER_KEY."""
        slot = await services_of(request).guard.open_stream(request.state.caller)
        return cls(request, slots=[slot])

    async def __aenter__(self) -> Hold:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and not self._handed:
            self._handed = True
            await self._give_back(release_jobs=True)

    async def _give_back(self, release_jobs: bool) -> None:
        with anyio.CancelScope(shield=True):
            for slot in self.slots:
                await release_slot(self._request, slot)
            for relay in self.relays if release_jobs else ():
                # A job a client would cancel by leaving is released as if it had
                # left (other readers keep it going); one only ever cancelled
                # explicitly is stopped: nobody was given its id.
                await (release(relay) if relay.cancel_on_disconnect else stop(relay))

    def add(self, relay: Relay, slot: str | None) -> None:
        """A job this request started, and the slot it holds for it."""
        self.relays.append(relay)
        self.slots.append(slot)

    def split(self) -> list[Hold]:
        """One Hold per job, each given back when its own job's answer ends (a
        non-streaming answer to several prompts)."""
        self._hand_over()
        return [Hold(self._request, [r], [s]) for r, s in zip(self.relays, self.slots, strict=True)]

    def _hand_over(self) -> None:
        assert not self._handed, "a Hold is handed to one answer"
        self._handed = True

    async def end(self) -> None:
        """Answered without its jobs (a 204): the slots back, the jobs left be."""
        self._hand_over()
        await self._give_back(release_jobs=False)

    def stream(
        self, events: AsyncIterator[bytes], headers: dict[str, str], sep: str | None = None
    ) -> Response:
        """An SSE response that gives the slots back when it ends (the relays in
        `events` release their jobs themselves). `sep`: the line end (sse-starlette's
        default is CRLF; /v1 sends LF, as OpenAI does)."""
        self._hand_over()
        services = services_of(self._request)

        async def holding_slots() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
            finally:
                await self._give_back(release_jobs=False)

        response: Response = EventSourceResponse(
            holding_slots(),
            ping=services.settings.sse_ping_seconds,
            headers={**headers, "Cache-Control": "no-cache"},
            sep=sep,
        )
        return response

    async def history(self, relay: Relay) -> list[JobEvent] | None:
        """All of one job's events once it has ended (a non-streaming answer); None
        if the client left first. The slots go back either way."""
        self._hand_over()
        try:
            return await collect_events(relay, self._request.is_disconnected)
        finally:
            await self._give_back(release_jobs=False)

    async def completed(self, split_thinking: bool = True) -> JobStatus | None:
        """Wait for the one job to end (non-streaming answers); None if the client left."""
        (relay,) = self.relays
        events = await self.history(relay)
        return summary_of(self._request, relay, events, split_thinking)


async def release_slot(request: Request, slot: str | None) -> None:
    if slot is None:
        return
    caller: Caller = request.state.caller
    with anyio.CancelScope(shield=True), contextlib.suppress(*UNREACHABLE):
        await services_of(request).guard.close_stream(caller, slot)


def summary_of(
    request: Request, relay: Relay, events: list[JobEvent] | None, split_thinking: bool
) -> JobStatus | None:
    if events is None:
        return None
    if not events:
        raise JobNotFoundError(relay.job_id)
    split = split_thinking and services_of(request).settings.thinking == "auto"
    return summarize(relay.job_id, events, split)
