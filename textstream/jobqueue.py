"""ModelQ, the queue our users chose: the only module that imports it.

ModelQ holds custody of a job from enqueue until a worker has finished it. We do
NOT read results through it (`get_stream`/`get_result` poll with 1 s sleeps, are
synchronous and truncate streams for late readers); tokens travel on our own
Redis Streams (transport/events.py).

Three ModelQ behaviours are deliberately worked around here:
- `import modelq` calls `logging.basicConfig(level=INFO)` and logs every task's
  arguments (the prompt) at INFO; `quiet_modelq_logging` caps it at WARNING.
- ModelQ wraps its Redis client in a proxy that retries forever (15 s sleeps).
  That is right for a worker waiting out an outage, wrong for the API, where a
  dead Redis must become a 503 within seconds: the producer enqueues through a
  plain asyncio pipeline of ours instead (`JobQueue`).
- `ModelQ()` and `@mq.task` register the calling process as a worker *server* in
  Redis (through that retry-forever proxy, so an API started while Redis is down
  would hang in start-up). The API is not a server: it uses `ProducerModelQ`,
  which skips registration, and enqueues with `ModelQ.enqueue_task`.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from modelq import ModelQ
from modelq.app.redis_retry import _RedisWithRetry
from modelq.app.tasks import Task

from textstream import keys
from textstream.config import Settings
from textstream.connections import sync_client
from textstream.job import CompletionJob
from textstream.logs import quiet_modelq_logging

__all__ = [
    "JobQueue",
    "ModelQ",
    "ProducerModelQ",
    "create_worker_modelq",
    "new_server_id",
]


def new_server_id() -> str:
    """A unique ModelQ server id per worker process.

    ModelQ defaults to the hostname, so two processes on one host would share one
    identity (and one set of in-flight lists) and could run a task twice. No ':'
    inside: ModelQ splits `inflight:<server>:<n>` on it.
    """
    host = socket.gethostname().replace(":", "-")
    return f"{host}-{uuid.uuid4().hex[:8]}"


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
    mq = ModelQ(redis_client=sync_client(settings, blocking_reads=True), server_id=server_id)
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
    """The API's side of ModelQ: puts jobs on the queue, never runs them.

    ModelQ's `enqueue_task` is synchronous and makes four round trips through its
    client, on a thread each. Here it runs against an asyncio MULTI/EXEC pipeline
    instead: its commands are buffered (ModelQ only writes, never reads back while
    enqueueing) and sent with our own task record in one atomic round trip, from the
    event loop, with no thread. A burst of a thousand requests no longer queues
    behind a thread pool, and a job is never half on the queue.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        quiet_modelq_logging()
        self._client = client
        self._settings = settings
        # With registration skipped, the constructor makes no Redis call; the client
        # it makes for itself never connects: each submit swaps in a pipeline.
        self._mq = ProducerModelQ(redis_client=None, server_id=f"api-{new_server_id()}")

    async def submit(self, job: CompletionJob) -> None:
        """Enqueue, the way ModelQ's task wrapper does, in one transaction."""
        payload = {
            "data": job.model_dump(mode="json"),
            "timeout": None,
            "stream": False,
            "retries": 0,
        }
        task = Task(task_name=keys.TASK_NAME, payload=payload, task_id=job.job_id)
        task_dict = task.to_dict()
        task_dict["created_at"] = task_dict["queued_at"] = time.time()
        pipe = self._client.pipeline(transaction=True)
        # Safe to swap in: enqueue_task is synchronous, so no other coroutine runs
        # on this event loop between the swap and the restore.
        self._mq.redis_client = pipe
        try:
            self._mq.enqueue_task(task_dict, payload=payload)
        finally:
            self._mq.redis_client = None
        pipe.set(keys.modelq_task(job.job_id), json.dumps(task_dict), ex=self._settings.job_ttl)
        await pipe.execute()


async def queue_length(client: aioredis.Redis) -> int:
    return int(await client.llen(keys.MODELQ_QUEUE))


async def queue_position(client: aioredis.Redis, job_id: str) -> int | None:
    """1-based place of a job in ModelQ's queue; None once a worker has claimed it."""
    rank = await client.zrank(keys.MODELQ_QUEUED_INDEX, job_id)
    return None if rank is None else int(rank) + 1
