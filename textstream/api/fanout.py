"""One request, several jobs: a list of prompts on /v1/completions becomes a job
per prompt (each through submit(), so they run side by side, each holding a stream
slot), answered together. What is shared by every such request lives here: the
submissions, taken back whole when one is refused; their streams, read as one;
their ends, waited for together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import anyio
from fastapi import Request

from textstream.api.deps import Services, services_of
from textstream.api.errors import InvalidInputError
from textstream.api.protocol import GenerationRequest, Prompt
from textstream.api.relay.sse import release
from textstream.api.responses import Hold, relay_for
from textstream.api.status import JobStatus
from textstream.api.submit import (
    CancelPolicy,
    Submission,
    estimated_prompt_tokens,
    submit,
    token_bound,
)


async def interleaved(parts: list[AsyncIterator[bytes]]) -> AsyncGenerator[bytes, None]:
    """The parts' chunks as they come, and b"" each time a part ends. Several parts
    are read by a task each; closing this stops them, and each part's own cleanup
    runs (relay_events releases its job). One part is read here, without a task."""
    if len(parts) == 1:
        async with contextlib.aclosing(as_generator(parts[0])) as part:
            async for chunk in part:
                yield chunk
        yield b""
        return
    arrived: asyncio.Queue[bytes | Exception] = asyncio.Queue()

    async def pump(part: AsyncIterator[bytes]) -> None:
        try:
            async with contextlib.aclosing(as_generator(part)) as chunks:
                async for chunk in chunks:
                    arrived.put_nowait(chunk)
        except Exception as exc:  # raised to the reader below
            arrived.put_nowait(exc)
            return
        arrived.put_nowait(b"")

    tasks = [asyncio.create_task(pump(part)) for part in parts]
    try:
        ended = 0
        while ended < len(tasks):
            got = await arrived.get()
            if isinstance(got, Exception):
                raise got
            ended += not got
            yield got
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):  # each release is bounded (sse.release)
            await asyncio.gather(*tasks, return_exceptions=True)


def as_generator(part: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """relay_events is an async generator, typed as the iterator it is used as."""
    return cast(AsyncGenerator[bytes, None], part)


async def submit_all(
    request: Request, prompts: list[tuple[Prompt, GenerationRequest]]
) -> tuple[list[Submission], Hold]:
    """Each prompt (or choice: `n`) its own job (submit()), so they run side by side,
    each holding a stream slot (MAX_STREAMS_PER_KEY counts jobs); the Hold on them
    all. A refusal of any gives back what the ones before it took: their jobs
    stopped (taken off the queue if no worker has them yet) and their slots."""
    services = services_of(request)
    check_fits_quota(services, prompts)
    policy = CancelPolicy.ON_DISCONNECT
    jobs: list[Submission] = []
    async with Hold(request) as hold:
        for prompt, generation in prompts:
            job = await submit(services, request.state.caller, prompt, generation, policy)
            jobs.append(job)
            hold.add(
                relay_for(request, job.job_id, job.model, job.deadline, policy, job.first), job.slot
            )
    return jobs, hold


def check_fits_quota(services: Services, prompts: list[tuple[Prompt, GenerationRequest]]) -> None:
    """Jobs that together could never fit in a minute's TOKEN_RATE_LIMIT are a 422
    up front (each alone is checked by submit()): otherwise the last ones would get a
    429 for ever, however long the client waited."""
    limit = services.settings.token_rate_limit
    if not limit or len(prompts) < 2:
        return
    most = sum(
        token_bound(services, estimated_prompt_tokens(prompt), gen) for prompt, gen in prompts
    )
    if most > limit:
        field = prompts[0][0].max_tokens_field
        raise InvalidInputError(
            field,
            f"these {len(prompts)} choices may use {most} tokens (prompts and {field});"
            f" the limit is {limit} a minute",
        )


async def completed_jobs(
    request: Request, hold: Hold, split_thinking: bool
) -> tuple[list[JobStatus], JobStatus | None] | None:
    """Every job's end (non-streaming answers), in order, and the first to fail, if
    one did: it stops the others, whose answers would not be sent. None if the
    client left (which stops them all). Each job's slot goes back as it ends."""
    failures: list[JobStatus] = []
    relays = hold.relays

    async def one(held: Hold) -> JobStatus | None:
        status = await held.completed(split_thinking)
        if status is not None and status.status != "done" and not failures:
            failures.append(status)
            for other in relays:
                if other is not held.relays[0]:
                    await release(other)
        return status

    statuses = await asyncio.gather(*map(one, hold.split()))
    done = [status for status in statuses if status is not None]
    if len(done) < len(statuses):
        return None
    return done, failures[0] if failures else None
