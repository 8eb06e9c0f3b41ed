"""ModelQ, the queue our users chose: the only module that imports it.

ModelQ holds custody of a job from enqueue until a worker has finished it. We do
NOT read results through it (`get_stream`/`get_result` poll with 1 s sleeps, are
synchronous and truncate streams for late readers); tokens travel on our own
Redis Streams (events.py).

Three ModelQ behaviours are deliberately worked around here:
- `import modelq` calls `logging.basicConfig(level=INFO)` and logs every task's
  arguments (the prompt) at INFO; `quiet_modelq_logging` caps it at WARNING.
- ModelQ wraps its Redis client in a proxy that retries forever (15 s sleeps).
  That is right for a worker waiting out an outage, wrong for the API, where a
  dead Redis must become a 503 within seconds: the producer gets a plain client.
- `ModelQ()` and `@mq.task` register the calling process as a worker *server* in
  Redis (through that retry-forever proxy, so an API started while Redis is down
  would hang in start-up). The API is not a server: it uses `ProducerModelQ`,
  which skips registration, and enqueues with `ModelQ.enqueue_task`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio as aioredis
from modelq import ModelQ
from modelq.app.redis_retry import _RedisWithRetry
from modelq.app.tasks import Task

from textstream import keys
from textstream.config import Settings
from textstream.schemas import CompletionJob

__all__ = [
    "JobQueue",
    "ModelQ",
    "ProducerModelQ",
    "create_worker_modelq",
    "new_server_id",
    "quiet_modelq_logging",
]


def quiet_modelq_logging() -> None:
    """ModelQ logs task arguments (prompts) at INFO; keep only its warnings."""
    logging.getLogger("modelq").setLevel(logging.WARNING)


def new_server_id() -> str:
    """A unique ModelQ server id per worker process.

    ModelQ defaults to the hostname, so two processes on one host would share one
    identity (and one set of in-flight lists) and could run a task twice. No ':'
    inside: ModelQ splits `inflight:<server>:<n>` on it.
    """
    host = socket.gethostname().replace(":", "-")
    return f"{host}-{uuid.uuid4().hex[:8]}"


def redis_client(settings: Settings, *, blocking_reads: bool = False) -> redis.Redis:
    """A synchronous client with bounded connect and read times.

    `blocking_reads` leaves room for ModelQ's 15 s BLMOVE inside the read timeout.
    """
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=60.0 if blocking_reads else settings.redis_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )


def tune_for_takeover(mq: ModelQ, settings: Settings) -> None:
    """ModelQ's liveness windows default to 30-300 s; a stream cannot wait that long.

    A running task's in-flight heartbeat is refreshed every second; any worker's
    sweep (every second) gives a task back to the queue once its heartbeat is
    TAKEOVER_AFTER_SECONDS old (`requeue_stuck_processing_tasks`), moving it out of
    the dead worker's custody list atomically. The claim blocks 2 s at a time so a
    draining worker stops claiming promptly.
    """
    mq.HEARTBEAT_INTERVAL = 1
    mq.PRUNE_CHECK_INTERVAL = 1
    mq.INFLIGHT_STALE_AFTER = settings.takeover_after_seconds
    mq.PRUNE_TIMEOUT = max(10.0, 2 * settings.takeover_after_seconds)
    mq.BLPOP_TIMEOUT = 2
    # After a Redis outage ModelQ's threads retry every 15 s (+-50 %); come back sooner.
    _RedisWithRetry.RETRY_DELAY = 1


def create_worker_modelq(
    settings: Settings, server_id: str, run_job: Callable[[CompletionJob], dict[str, Any]]
) -> ModelQ:
    """The worker's ModelQ instance with the completion task registered on it."""
    quiet_modelq_logging()
    mq = ModelQ(redis_client=redis_client(settings, blocking_reads=True), server_id=server_id)
    tune_for_takeover(mq, settings)

    def generate_completion(job: CompletionJob) -> dict[str, Any]:
        return run_job(job)

    assert generate_completion.__name__ == keys.TASK_NAME
    mq.task(schema=CompletionJob)(generate_completion)
    return mq


class ProducerModelQ(ModelQ):  # type: ignore[misc]
    """A ModelQ that only enqueues: it never registers itself as a worker server."""

    def register_server(self) -> None:
        return None


class JobQueue:
    """The API's side of ModelQ: puts jobs on the queue, never runs them."""

    #: ModelQ's enqueue is synchronous (five round trips). asyncio's default pool
    #: (cores + 4 threads) made a burst of hundreds of requests queue behind it
    #: past ENQUEUE_TIMEOUT; a pool of its own keeps bursts moving.
    THREADS = 32

    def __init__(self, settings: Settings) -> None:
        quiet_modelq_logging()
        self._settings = settings
        self._executor = ThreadPoolExecutor(self.THREADS, thread_name_prefix="enqueue")
        self._client = redis_client(settings)
        # With registration skipped, the constructor makes no Redis call.
        self._mq = ProducerModelQ(redis_client=self._client, server_id=f"api-{new_server_id()}")
        # Swap ModelQ's retry-forever proxy for the plain client (see module docstring).
        self._mq.redis_client = self._client

    async def submit(self, job: CompletionJob) -> None:
        """Enqueue from the event loop, on this queue's own threads."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self.enqueue, job)

    def enqueue(self, job: CompletionJob) -> None:
        """Blocking: use `submit` from async code. Mirrors ModelQ's task wrapper."""
        payload = {
            "data": job.model_dump(mode="json"),
            "timeout": None,
            "stream": False,
            "retries": 0,
        }
        task = Task(task_name=keys.TASK_NAME, payload=payload, task_id=job.job_id)
        task_dict = task.to_dict()
        now = time.time()
        task_dict["created_at"] = task_dict["queued_at"] = now
        self._mq.enqueue_task(task_dict, payload=payload)
        record = json.dumps(task_dict)
        self._client.set(keys.modelq_task(job.job_id), record, ex=self._settings.job_ttl)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()


async def queue_length(client: aioredis.Redis) -> int:
    return int(await client.llen(keys.MODELQ_QUEUE))


async def queue_position(client: aioredis.Redis, job_id: str) -> int | None:
    """1-based place of a job in ModelQ's queue; None once a worker has claimed it."""
    rank = await client.zrank(keys.MODELQ_QUEUED_INDEX, job_id)
    return None if rank is None else int(rank) + 1
