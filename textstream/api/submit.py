"""One way in: every route that starts a job calls `submit()`.

submit() checks the input, then answers from the response cache or queues a new
job, in that order, so a refusal never leaves anything behind. Errors are domain
exceptions (errors.py); no HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import anyio

from textstream import fairness
from textstream.api.cache import cache_key, cached_job, claim, forget
from textstream.api.deps import Services, tenant_of
from textstream.api.errors import (
    ContextLengthError,
    InvalidInputError,
    JobNotFoundError,
    QueueFullError,
    QueueUnavailableError,
    ServerBusyError,
)
from textstream.api.models import resolve_model
from textstream.api.protocol import GenerationRequest, Prompt
from textstream.api.queue import CallerQueueFull, queue_length
from textstream.api.relay.job_events import JobAccess
from textstream.api.relay.sse import QueueHooks
from textstream.api.security import Caller, TokenHold, key_identity
from textstream.connections import UNREACHABLE
from textstream.fairness import Share, estimate
from textstream.grammars import GrammarError, check_schema
from textstream.job import CompletionJob
from textstream.transport.events import JobEvent, entry_seconds

log = logging.getLogger(__name__)

#: Characters allowed in a prompt although Unicode calls them control characters.
ALLOWED_CONTROLS = frozenset("\n\r\t")

#: Characters per token of context window a prompt may have before it is tokenized.
#: Tokens decide whether a prompt fits; characters only keep an abusive prompt from
#: being tokenized at all (in a thread of the API process). English runs about 4
#: characters a token, code and CJK fewer; tokens past 16 characters are runs of
#: one character (GPT-2's longest is "-" x 64), so only a prompt that is mostly such
#: runs (padding, not text) can fit the window and still pass this limit.
CHARS_PER_TOKEN = 16


class CancelPolicy(StrEnum):
    """Who may end a job before it is done."""

    #: /completion and /v1: the job ends when its last reader disconnects.
    ON_DISCONNECT = "on_disconnect"
    #: POST /jobs: the job runs to its end unless DELETE cancels it.
    EXPLICIT = "explicit"


@dataclass
class Submission:
    job_id: str
    deadline: float | None
    #: The served model it went to.
    model: str
    #: Answered by an existing job (cache hit, or an identical request in flight).
    shared: bool = False
    #: The stream slot this request holds (MAX_STREAMS_PER_KEY) until its answer ends.
    slot: str | None = None
    #: A new job's `queued` event, as this request wrote it: its relay starts from
    #: it rather than reading it back (one Redis round trip less per submission).
    first: JobEvent | None = None


async def submit(
    services: Services,
    caller: Caller,
    prompt: Prompt,
    request: GenerationRequest,
    policy: CancelPolicy,
) -> Submission:
    """Validate; take a stream slot (ON_DISCONNECT requests hold one until their
    answer ends); then answer from the cache or queue the job. A refusal at any step
    gives back what the steps before it took, so it leaves nothing behind."""
    check_prompt(prompt.checked_text, services, prompt.field)
    check_request(request, services, prompt.max_tokens_field)
    await check_output_schema(request, prompt.schema_field)
    model = await resolve_model(services, request.model)
    prompt_tokens = await check_context_window(services, prompt, request, model)
    hold = await reserve_tokens(services, caller, prompt, request, prompt_tokens)
    slot = None
    try:
        if policy is CancelPolicy.ON_DISCONNECT:
            slot = await services.guard.open_stream(caller)
        tenant = tenant_of(services, caller)
        share = share_of(services, caller, request.priority)
        wait = request.queue_timeout or caller.queue_timeout
        async with submission_turn(services):
            submission = await start_job(
                services, tenant, model, prompt, request, policy, Place(share, wait, hold)
            )
    except BaseException:  # shielded: a cancelled request still gives back
        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
            with contextlib.suppress(*UNREACHABLE):
                await services.guard.close_stream(caller, slot)
            with contextlib.suppress(*UNREACHABLE):
                await services.guard.release_tokens(hold)
        raise
    if submission.shared:  # answered by a job someone else's request made
        with contextlib.suppress(*UNREACHABLE):
            await services.guard.release_tokens(hold)
    submission.slot = slot
    return submission


@dataclass(frozen=True)
class Place:
    """Whose a new job is and what it may hold: its share of the fair order, how
    long it will wait for a worker, and the tokens it reserved (TOKEN_RATE_LIMIT)."""

    share: Share
    wait: float | None = None
    hold: TokenHold | None = None


@contextlib.asynccontextmanager
async def submission_turn(services: Services) -> AsyncIterator[None]:
    """Take a turn at queueing (at most MAX_SUBMITTING at once per API process).

    A burst of a thousand requests at one process would otherwise start a thousand
    enqueues at once, each waiting on the same event loop: most would pass
    ENQUEUE_TIMEOUT and be answered 503, blaming a Redis that is fine. Waiting for a
    turn keeps each enqueue short, so ENQUEUE_TIMEOUT keeps meaning "Redis did not
    answer"; a request that waits ADMISSION_WAIT_SECONDS for its turn is answered
    429 (this process is saturated: retry, or another replica), with nothing written."""
    gate = services.submitting
    try:
        async with asyncio.timeout(services.settings.admission_wait_seconds):
            await gate.acquire()
    except TimeoutError:
        log.warning("submission refused: this API process is saturated")
        raise ServerBusyError("this API process is saturated; retry shortly") from None
    try:
        yield
    finally:
        gate.release()


def prompt_char_limit(services: Services) -> int:
    """The longest prompt, in characters, worth tokenizing: MAX_PROMPT_CHARS, or
    CHARS_PER_TOKEN per token of the largest context window served if more (of the
    models whose tokens are counted: not an upstream engine's, whose window may be
    a guess, nor the fake engine's)."""
    window = services.prompt_tokens.largest_counted_window()
    return max(services.settings.max_prompt_chars, CHARS_PER_TOKEN * window)


def check_prompt(text: str, services: Services, field: str) -> None:
    """Cheap checks before the prompt is tokenized (check_context_window)."""
    if not text.strip():
        raise InvalidInputError(field, "the prompt is empty")
    limit = prompt_char_limit(services)
    if len(text) > limit:
        raise InvalidInputError(
            field,
            f"the prompt is {len(text)} characters; the limit is {limit} (MAX_PROMPT_CHARS,"
            f" or {CHARS_PER_TOKEN} per token of the largest context window served)",
        )
    for ch in text:
        if ch not in ALLOWED_CONTROLS and unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidInputError(field, f"the prompt contains control character U+{ord(ch):04X}")


def check_request(request: GenerationRequest, services: Services, field: str) -> None:
    limit = services.settings.max_new_tokens_limit
    if request.max_new_tokens is not None and request.max_new_tokens > limit:
        raise InvalidInputError(field, f"{field} must be at most {limit}")


#: How long compiling an output schema's grammar may take here. llguidance's own
#: limits bound its work well below this; this bounds the request whatever happens.
SCHEMA_CHECK_SECONDS = 2.0


async def check_output_schema(request: GenerationRequest, field: str) -> None:
    """Refuse a schema that cannot constrain the output (invalid, unsupported, too
    big or too costly to compile) before anything is queued, so no worker meets it.
    Compiled without the model's tokenizer (this process may have none); the
    worker compiles it again for its tokenizer, from a cache."""
    schema = request.json_schema
    if schema is None:
        return
    assert isinstance(schema, str)  # canonical text, by GenerationRequest's validator
    try:
        async with asyncio.timeout(SCHEMA_CHECK_SECONDS):
            await asyncio.to_thread(check_schema, schema)
    except GrammarError as exc:
        raise InvalidInputError(field, str(exc)) from None
    except TimeoutError:
        raise InvalidInputError(field, "the schema is too costly to compile") from None


async def check_context_window(
    services: Services, prompt: Prompt, request: GenerationRequest, model: str
) -> int:
    """The prompt's tokens (counted, or estimated from its characters where this
    process cannot count them); raises past the model's context window."""
    counted = await services.prompt_tokens.count(
        model, prompt.text, request.prompt_format, prompt.messages, prompt.tools
    )
    if counted is None:
        return estimated_prompt_tokens(prompt)
    if counted[0] >= counted[1]:
        # `messages` for a chat: the field the client sent
        raise ContextLengthError(prompt.field, counted[0], counted[1])
    return counted[0]


def token_bound(services: Services, prompt_tokens: int, request: GenerationRequest) -> int:
    """The most tokens a request may use: its prompt and all of its max_tokens."""
    return prompt_tokens + (request.max_new_tokens or services.settings.default_max_new_tokens)


def estimated_prompt_tokens(prompt: Prompt) -> int:
    """A prompt's tokens where they cannot be counted (fairness.CHARS_PER_TOKEN)."""
    return len(prompt.checked_text) // fairness.CHARS_PER_TOKEN + 1


async def reserve_tokens(
    services: Services, caller: Caller, prompt: Prompt, request: GenerationRequest, tokens: int
) -> TokenHold | None:
    """Reserve the request's most (its prompt and max_tokens) against the caller's
    TOKEN_RATE_LIMIT; a request that could never fit in it is refused outright."""
    limit = services.settings.token_rate_limit
    most = token_bound(services, tokens, request)
    if limit and most > limit:
        raise InvalidInputError(
            prompt.max_tokens_field,
            f"this request may use {most} tokens (prompt and {prompt.max_tokens_field});"
            f" the limit is {limit} a minute",
        )
    return await services.guard.reserve_tokens(caller, most)


def share_of(services: Services, caller: Caller, priority: int) -> Share:
    """The caller's place in the fair order (fairness.py): its identity (without
    API keys, its address, as the rate limit tells callers apart) and weight."""
    weights = {key_identity(k): w for k, w in services.settings.key_weights.items()}
    return Share(caller.identity, weights.get(caller.identity, 1.0), priority)


async def start_job(
    services: Services,
    tenant: str,
    model: str,
    prompt: Prompt,
    request: GenerationRequest,
    policy: CancelPolicy,
    place: Place,
) -> Submission:
    """Answer from the response cache, or queue a new job (that a worker must start
    within `place.wait` seconds, if given, or it ends with `queue_timeout`)."""
    settings, share, wait = services.settings, place.share, place.wait
    params = request.sampling(settings.default_max_new_tokens)
    job_id = ""
    try:
        async with asyncio.timeout(settings.enqueue_timeout):
            job_id = await services.jobs.new_job_id()
            now = time.time()
            job = CompletionJob(
                job_id=job_id,
                model=model,
                prompt=prompt.text,
                messages=prompt.messages,
                tools=prompt.tools,
                tool_choice=prompt.tool_choice if prompt.tools else None,
                parallel_tool_calls=prompt.parallel_tool_calls if prompt.tools else None,
                continue_final=prompt.continue_final,
                prompt_format=request.prompt_format,
                params=params,
                enqueued_at=now,
                deadline=now + settings.job_timeout,
                queue_deadline=now + min(wait, settings.job_timeout) if wait else None,
                caller=share.caller,
                weight=share.weight,
                priority=share.priority,
                charge=estimate(len(prompt.checked_text), params.max_new_tokens) / share.weight,
                quota_key=place.hold.key if place.hold else "",
                quota_tokens=place.hold.tokens if place.hold else 0,
            )
            waiting = await queue_length(services.redis, model)
            if waiting >= settings.max_queued_jobs:  # refused before writing anything
                raise QueueFullError(f"{waiting} jobs are waiting; retry shortly")
            # A job that may end unrun (queue_timeout) is no answer for others.
            cacheable = request.use_cache and job.queue_deadline is None
            key = await cache_key_for(services, job, tenant, cacheable)
            if key:
                followed = await follow_cached(services, key, model, policy)
                if followed is None and not await claim(
                    services.redis, key, job.job_id, settings.cache_ttl
                ):
                    followed = await follow_cached(services, key, model, policy)
                if followed is not None:
                    return followed
            first = await queue_job(services, job, tenant, key, policy, waiting + 1)
    except UNREACHABLE as exc:
        log.warning("job=%s could not be queued: %s", job_id, type(exc).__name__)
        raise QueueUnavailableError("the job queue (Redis) is unreachable; retry shortly") from exc
    log.info("job=%s queued model=%s max_new_tokens=%d", job.job_id, model, params.max_new_tokens)
    return Submission(job.job_id, job.deadline, model, first=first)


async def cache_key_for(
    services: Services, job: CompletionJob, tenant: str, use_cache: bool
) -> str | None:
    """The job's response-cache key, or None when it may not be cached. The cache is
    per tenant unless CACHE_SCOPE=global: one key never gets another's job."""
    if not (use_cache and services.settings.cache_ttl and job.params.deterministic):
        return None
    scope = "" if services.settings.cache_scope == "global" else tenant
    return cache_key(job, scope)


async def follow_cached(
    services: Services, key: str, model: str, policy: CancelPolicy
) -> Submission | None:
    settings = services.settings
    job_id = await cached_job(
        services.redis,
        services.jobs,
        key,
        ttl=settings.cache_ttl,
        creating=settings.enqueue_timeout,
    )
    if job_id is None:
        return None
    await track(services, job_id, policy)
    log.info("job=%s answered from the response cache", job_id)
    return Submission(job_id, await job_deadline(services, job_id), model, shared=True)


async def track(services: Services, job_id: str, policy: CancelPolicy) -> None:
    await services.jobs.track(
        job_id,
        reader=policy is CancelPolicy.ON_DISCONNECT,
        pinned=policy is CancelPolicy.EXPLICIT,
    )


async def queue_job(
    services: Services,
    job: CompletionJob,
    tenant: str,
    key: str | None,
    policy: CancelPolicy,
    position: int,
) -> JobEvent:
    """Write the job's stream (its `queued` event and whose it is), then hand it to
    ModelQ, within the queue bound; the `queued` event written.

    The stream goes first so it exists before any worker can write to it. If the
    queue then refuses (it filled up since the length was read), the stream and
    the cache claim are removed again: nobody has the job's id yet.
    """
    first = await services.jobs.create(
        job.job_id,
        {"job_id": job.job_id, "position": position},
        tenant=tenant,
        model=job.model,
        shared=bool(key) and services.settings.cache_scope == "global",
        reader=policy is CancelPolicy.ON_DISCONNECT,
        pinned=policy is CancelPolicy.EXPLICIT,
        cache_key=key,
    )
    refusal = QueueFullError(f"{services.settings.max_queued_jobs} jobs are waiting; retry shortly")
    try:
        if first is not None and await admitted(services, job):
            return first
    except CallerQueueFull as full:  # this caller's share of the queue is taken
        refusal = QueueFullError(str(full))
    if first is not None:  # never another job's stream (an id taken: not ours to remove)
        await services.jobs.discard(job.job_id)
    if key:
        await forget(services.redis, key, job.job_id)
    raise refusal


async def admitted(services: Services, job: CompletionJob) -> bool:
    """Queue the job unless MAX_QUEUED_JOBS are waiting (one atomic step)."""
    try:
        return await services.queue.submit(job) is not None
    except CallerQueueFull:
        raise  # nothing was written
    except BaseException:
        # Unknown whether it was queued: a job with no stream would be skipped by
        # its worker, so remove the stream rather than leave a job nobody can name.
        with contextlib.suppress(*UNREACHABLE):
            await services.queue.withdraw(job.job_id, job.model)
            await services.jobs.discard(job.job_id)
        raise


async def job_deadline(services: Services, job_id: str) -> float | None:
    """The job's deadline, from its first (`queued`) event. Raises if there is no job."""
    first = await services.jobs.first_event_id(job_id)
    if first is None:
        raise JobNotFoundError(job_id)
    return entry_seconds(first) + services.settings.job_timeout


async def check_access(
    services: Services, caller: Caller, job_id: str, *, own: bool = False
) -> JobAccess:
    """Raise JobNotFoundError unless `caller` may see the job: its creator, anyone
    when the API is open, anyone for a job shared through a global cache (reading
    only: `own` asks for its creator, as DELETE does). Another key's job answers
    404, exactly as a job that does not exist."""
    access = await services.jobs.access(job_id)
    if not access.exists:
        raise JobNotFoundError(job_id)
    if not services.guard.enabled:
        return access
    mine = access.tenant == caller.identity
    if not (mine or (access.shared and not own)):
        raise JobNotFoundError(job_id)
    return access


def queue_hooks(services: Services, model: str) -> QueueHooks:
    """What a relay may ask of its job's queue: the job's position and the live
    workers of its model (from snapshots shared by all this process's readers:
    queue_watch.py), and taking a job that ended unclaimed off the queue."""

    async def report(job_id: str) -> dict[str, Any]:
        settings = services.settings
        return await services.queue_watch.report(
            services.redis,
            model,
            job_id,
            period=settings.queue_status_seconds,
        )

    async def withdraw(job_id: str) -> bool:
        return await services.queue.withdraw(job_id, model)

    return QueueHooks(report=report, withdraw=withdraw)
