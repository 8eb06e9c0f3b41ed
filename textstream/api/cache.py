"""The response cache: identical deterministic requests share one generation.

A request is deterministic when it is greedy or seeded. Its key is the SHA-256 of
the served model, the prompt (or chat messages), the prompt format and every
sampling parameter. The entry points at the job whose stream holds the answer:

- a job still generating is simply followed (single-flight: N identical requests,
  one generation);
- a finished job is replayed from its stream, with no worker involved;
- a job that ends in error or is cancelled has its entry removed (by the API when
  it ended the job, else by the next request that finds the entry), so failures
  are never served from the cache.

The entry is claimed with SET NX before the job is queued, so two identical
requests racing each other still cause one generation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

import redis.asyncio as aioredis

from textstream import keys
from textstream.api.relay.job_events import JobEvents
from textstream.job import CompletionJob


def cache_key(job: CompletionJob, tenant: str = "") -> str:
    """What makes two jobs the same answer: the tenant (the caller's identity; ""
    for a shared cache), the model, what to complete and how to sample."""
    identity: dict[str, Any] = {
        "tenant": tenant,
        "model": job.model,
        "prompt": job.prompt,
        "messages": job.messages,
        "continue_final": job.continue_final,
        "prompt_format": job.prompt_format,
        "params": job.params.model_dump(mode="json"),
    }
    if job.params.logprobs is None:  # keys of jobs without logprobs stay as they were
        identity["params"].pop("logprobs", None)
    if job.tools:  # only then: keys of jobs without tools stay as they were
        identity["tools"] = job.tools
        identity["tool_choice"] = [job.tool_choice, job.parallel_tool_calls]
    encoded = json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()
    return keys.cache_entry(hashlib.sha256(encoded).hexdigest())


async def cached_job(
    client: aioredis.Redis, jobs: JobEvents, key: str, *, ttl: int, creating: float
) -> str | None:
    """The job answering `key`, if it can still be used (not failed, not expired).
    The entry is on the queue's Redis (`client`), the job's stream on the streams'
    (`jobs`); an entry whose job failed is dropped here, so a failure is never
    served even where its worker could not drop the entry itself.

    An entry younger than `creating` seconds (it was set with `ttl`) may belong to a
    request still creating its job: the entry is claimed before the job's stream is
    written. Its stream is waited for, up to that age, rather than taken for an
    expired job (which let an identical request arriving in between start a second
    generation)."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        raw, left_ms = await pipe.execute()
    if raw is None:
        return None
    job_id = bytes(raw).decode()
    wait_until = time.monotonic() + creating - (ttl - max(left_ms, 0) / 1000)
    # Polled: the stream appears in Redis, written by another process.
    while not await jobs.exists(job_id) and time.monotonic() < wait_until:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    if not await jobs.usable(job_id):
        await forget(client, key, job_id)
        return None
    return job_id


async def claim(client: aioredis.Redis, key: str, job_id: str, ttl: int) -> bool:
    """Make `job_id` the answer for `key`, unless another request got there first."""
    return bool(await client.set(key, job_id, nx=True, ex=ttl))


FORGET_IF_SAME = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


async def forget(client: aioredis.Redis, key: str, job_id: str) -> None:
    await client.eval(FORGET_IF_SAME, 1, key, job_id)
