"""The API's side of ModelQ, the queue our users chose: it puts jobs on a model's
queue and takes unclaimed ones off, and never runs one (worker/queue.py claims).

Two ModelQ behaviours (modelq 1.0.19) are worked around here:
- ModelQ wraps its Redis client in a proxy that retries forever (15 s sleeps),
  right for a worker waiting out an outage, wrong for the API, where a dead Redis
  must be a 503 within seconds: ModelQ's enqueue runs against a recording pipeline
  and the recorded commands run in one script of ours, on our asyncio client.
- `ModelQ()` registers the process as a worker *server* in Redis (through that
  proxy, so an API started while Redis is down would hang): `ProducerModelQ`
  skips it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis
from modelq import ModelQ
from modelq.app.tasks import Task

from textstream import fairness, keys
from textstream.config import Settings
from textstream.job import CompletionJob
from textstream.logs import quiet_modelq_logging

__all__ = [
    "CallerQueueFull",
    "JobQueue",
    "ProducerModelQ",
    "expired_head",
    "overdue",
    "queue_length",
    "queue_order",
    "queue_position",
    "trim_records",
    "waiting_since",
]


class ProducerModelQ(ModelQ):  # type: ignore[misc]
    """A ModelQ that only enqueues: it never registers itself as a worker server,
    and keeps no task history (ModelQ's `task_history` sorted set gains a member
    per task forever, and `task_history:{id}` holds the prompt for a day)."""

    def register_server(self) -> None:
        return None

    def _add_to_task_history(self, task_id: str, task_dict: dict[str, Any]) -> None:
        return None


#: Puts one task on the queue unless MAX_QUEUED_JOBS are already waiting, in one
#: atomic step (a length read, then a push, let 50 concurrent requests past a bound
#: of 5). The commands are those ModelQ's own `enqueue_task` issues, recorded, plus
#: our `task:{id}` record.
#: KEYS[1]: the queue; KEYS[2..]: the key of each recorded command, in order.
#: ARGV[1]: the bound; ARGV[2]: how many commands; then per command: its name, its
#: argument count n, and its n arguments after the key.
ADMIT_SCRIPT = (
    """
local waiting = redis.call('LLEN', KEYS[1])
if waiting >= tonumber(ARGV[1]) then return -1 end
if redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[2]) then return -2 end
local pos = 9
for i = 1, tonumber(ARGV[8]) do
  local n = tonumber(ARGV[pos + 1])
  local call = {ARGV[pos], KEYS[i + 6]}
  for j = 1, n do call[#call + 1] = ARGV[pos + 1 + j] end
  redis.call(unpack(call))
  pos = pos + 2 + n
end
"""
    + fairness.ADMIT_FAIR
    + """
return waiting
"""
)

#: Takes a task that no worker has claimed yet off the queue, with its records:
#: a cancelled or expired job must stop counting against MAX_QUEUED_JOBS, and its
#: prompt must not wait in the list for a worker to skip it. Atomic against a
#: worker's claim (BLMOVE): exactly one of the two gets the task. The list entry is
#: found by its exact text (as `task:{id}` holds it), else by its JSON prefix
#: (json.dumps writes "task_id" first; a prompt cannot forge it, quotes are escaped).
#: KEYS: queue, queued index, task:{id}, fair owners, fair backlog. ARGV: task id,
#: the fair waiting prefix. Returns entries removed.
WITHDRAW_SCRIPT = (
    """
local removed = 0
local blob = redis.call('GET', KEYS[3])
if blob then removed = redis.call('LREM', KEYS[1], 0, blob) end
if removed == 0 then
  local prefix = '{"task_id": "' .. ARGV[1] .. '", '
  local len = redis.call('LLEN', KEYS[1])
  local found = {}
  for start = 0, len - 1, 256 do
    for _, entry in ipairs(redis.call('LRANGE', KEYS[1], start, start + 255)) do
      if string.sub(entry, 1, #prefix) == prefix then found[#found + 1] = entry end
    end
  end
  for _, entry in ipairs(found) do removed = removed + redis.call('LREM', KEYS[1], 0, entry) end
end
if removed > 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('DEL', KEYS[3])
"""
    + fairness.WITHDRAW_FAIR
    + """
end
return removed
"""
)


class CallerQueueFull(Exception):
    """The caller already has its share of the queue waiting (MAX_QUEUED_PER_CALLER)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"this caller already has {limit} jobs waiting; retry shortly")
        self.limit = limit


class JobQueue:
    """The API's side of ModelQ: puts jobs on the queue, never runs them.

    ModelQ's `enqueue_task` is synchronous and makes several round trips through
    its client. Here it runs against a recording pipeline instead (never executed:
    ModelQ only writes while enqueueing), and the commands it recorded run in one
    atomic script with the queue bound (ADMIT_SCRIPT), from the event loop, with no
    thread. A burst of a thousand requests queues nothing past the bound, and a job
    is never half on the queue.
    """

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        quiet_modelq_logging()
        self._client = client
        self._settings = settings
        self._admit = client.register_script(ADMIT_SCRIPT)
        self._withdraw = client.register_script(WITHDRAW_SCRIPT)
        self._settle_tokens = client.register_script(fairness.SETTLE_TOKENS_SCRIPT)
        # With registration skipped, the constructor makes no Redis call; the client
        # it makes for itself never connects: each submit swaps in a recorder.
        self._mq = ProducerModelQ(redis_client=None, server_id=f"api-{uuid.uuid4().hex[:8]}")
        #: Makes the recording pipelines; never connects (made once: a client is ~50 µs).
        self._recorder = redis.Redis()

    def _recorded_enqueue(self, job: CompletionJob) -> list[tuple[Any, ...]]:
        """The commands ModelQ's enqueue_task issues for `job`, plus our task record."""
        payload = {
            "data": job.model_dump(mode="json"),
            "timeout": None,
            "stream": False,
            "retries": 0,
        }
        task = Task(task_name=keys.TASK_NAME, payload=payload, task_id=job.job_id)
        task_dict = task.to_dict()
        task_dict["created_at"] = task_dict["queued_at"] = time.time()
        recorder = self._recorder.pipeline(transaction=False)
        self._mq.redis_client = recorder
        try:
            self._mq.enqueue_task(task_dict, payload=payload)
        finally:
            self._mq.redis_client = None
        recorder.set(keys.modelq_task(job.job_id), json.dumps(task_dict), ex=self._settings.job_ttl)
        if job.queue_deadline is not None:  # for the janitor (api/janitor.end_overdue)
            recorder.zadd(keys.queue_deadlines(job.model), {job.job_id: job.queue_deadline})
        return [tuple(args) for args, _options in recorder.command_stack]

    async def submit(self, job: CompletionJob) -> int | None:
        """Queue the job on its model's queue, recorded under its caller for the fair
        order (fairness.py); its 1-based place there, or None when MAX_QUEUED_JOBS
        are already waiting (then nothing was written). Raises CallerQueueFull when
        its caller has MAX_QUEUED_PER_CALLER waiting (nothing written either)."""
        model, scope = job.model, keys.queue_scope(job.model)
        commands = [
            (name, scope.get(key, key), *rest) for name, key, *rest in self._recorded_enqueue(job)
        ]
        per_caller = self._settings.queued_per_caller_limit
        args: list[Any] = [
            self._settings.max_queued_jobs,
            per_caller,
            job.caller,
            job.job_id,
            fairness.order_score(job.priority, job.enqueued_at or None),
            repr(job.charge),
            fairness.COUNTERS_TTL,
            len(commands),
        ]
        for name, _key, *rest in commands:
            args += [name, len(rest), *rest]
        fair_keys = [
            keys.fair_backlog(model),
            keys.fair_counters(model),
            keys.fair_owners(model),
            keys.fair_floor(model),
            keys.fair_waiting_prefix(model) + job.caller,
        ]
        waiting = int(
            await self._admit(
                keys=[scope[keys.MODELQ_QUEUE], *fair_keys, *(c[1] for c in commands)], args=args
            )
        )
        if waiting == -2:
            raise CallerQueueFull(per_caller)
        return None if waiting < 0 else waiting + 1

    async def withdraw(self, job_id: str, model: str, give_back: bool = True) -> bool:
        """Take a job no worker has claimed off its queue; False if none had it. Its
        tokens reserved against TOKEN_RATE_LIMIT are given back (it never ran),
        unless `give_back` is False (it is moved to another queue, not ended)."""
        blob = None
        if give_back and self._settings.token_rate_limit:  # read before the script deletes it
            blob = await self._client.get(keys.modelq_task(job_id))
        removed = await self._withdraw(
            keys=[
                keys.queue_key(model, keys.MODELQ_QUEUE),
                keys.queue_key(model, keys.MODELQ_QUEUED_INDEX),
                keys.modelq_task(job_id),
                keys.fair_owners(model),
                keys.fair_backlog(model),
            ],
            args=[job_id, keys.fair_waiting_prefix(model)],
        )
        if int(removed) > 0 and blob is not None:
            await self._give_back_tokens(blob)
        return int(removed) > 0

    async def _give_back_tokens(self, blob: bytes | str) -> None:
        try:
            data = json.loads(blob)["payload"]["data"]
            key, tokens = str(data.get("quota_key") or ""), int(data.get("quota_tokens") or 0)
        except (ValueError, KeyError, TypeError):
            return
        if key and tokens:
            await self._settle_tokens(keys=[key], args=[-tokens])

    async def move(self, job_id: str, model: str, to: str) -> bool | None:
        """Move a job no worker has claimed from `model`'s queue to the end of `to`'s
        (api/models.py: the fallback served in `model`'s place). True when moved;
        False when it was not waiting there (claimed, withdrawn, moved by another
        API process: withdraw decides, atomically); None when it was taken off but
        `to`'s queue is full: the caller ends it."""
        blob = await self._client.get(keys.modelq_task(job_id))
        if blob is None or not await self.withdraw(job_id, model, give_back=False):
            return False
        job = CompletionJob.model_validate(json.loads(blob)["payload"]["data"])
        job.model = to
        return None if await self.submit(job) is None else True


async def queue_length(client: aioredis.Redis, model: str) -> int:
    return int(await client.llen(keys.queue_key(model, keys.MODELQ_QUEUE)))


async def queue_position(client: aioredis.Redis, model: str, job_id: str) -> int | None:
    """1-based place of a job in its model's queue; None once a worker claimed it."""
    rank = await client.zrank(keys.queue_key(model, keys.MODELQ_QUEUED_INDEX), job_id)
    return None if rank is None else int(rank) + 1


async def overdue(client: aioredis.Redis, model: str, now: float, limit: int) -> list[str]:
    """Ids of jobs of `model`'s queue whose queue_timeout has passed (some may have
    been claimed or withdrawn since: JobQueue.withdraw decides)."""
    ids = await client.zrangebyscore(keys.queue_deadlines(model), "-inf", now, start=0, num=limit)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


async def waiting_since(client: aioredis.Redis, model: str, before: float, limit: int) -> list[str]:
    """Ids of a model's unclaimed jobs queued before `before` (unix time), oldest first."""
    index = keys.queue_key(model, keys.MODELQ_QUEUED_INDEX)
    ids = await client.zrangebyscore(index, "-inf", before, start=0, num=limit)
    return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]


async def queue_order(client: aioredis.Redis, model: str) -> list[str]:
    """The ids of a model's waiting jobs, first in line first (position = index + 1):
    one read for every job of the queue (api/queue_watch.py)."""
    members = await client.zrange(keys.queue_key(model, keys.MODELQ_QUEUED_INDEX), 0, -1)
    return [m.decode() if isinstance(m, bytes) else str(m) for m in members]


def expiry_of(entry: bytes | str, job_ttl: int) -> tuple[str, float] | None:
    """(job id, when it expires) of a queue entry: its deadline (JOB_TIMEOUT), and
    never later than JOB_TTL after it was queued."""
    try:
        task = json.loads(entry)
        data = task["payload"]["data"]
        latest = float(task.get("queued_at") or data.get("enqueued_at") or time.time()) + job_ttl
        deadline = data.get("deadline")
        return str(task["task_id"]), min(float(deadline), latest) if deadline else latest
    except (ValueError, KeyError, TypeError):
        return None


async def expired_head(client: aioredis.Redis, model: str, job_ttl: int, now: float) -> str | None:
    """The job at the head of a model's queue (the oldest), if it has expired: no
    worker claimed it in time, and its prompt must not wait there for one."""
    entry = await client.lindex(keys.queue_key(model, keys.MODELQ_QUEUE), 0)
    expiry = None if entry is None else expiry_of(entry, job_ttl)
    if expiry is None or expiry[1] > now:
        return None
    return expiry[0]


async def trim_records(client: aioredis.Redis, model: str, job_ttl: int, now: float) -> None:
    """Trim what ModelQ never trims: the `task_history` sorted set (one member per
    task, forever; written by ModelQ versions before ours stopped it), queued-index
    ids whose tasks are long gone (a claim skipped as a duplicate leaks one), and
    in-flight heartbeats no worker refreshed for JOB_TTL."""
    cutoff, scope = now - job_ttl, keys.queue_scope(model)
    async with client.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(keys.MODELQ_TASK_HISTORY, "-inf", cutoff)  # ModelQ's, unscoped
        pipe.zremrangebyscore(scope[keys.MODELQ_TASK_HISTORY], "-inf", cutoff)
        pipe.zremrangebyscore(scope[keys.MODELQ_QUEUED_INDEX], "-inf", cutoff)
        pipe.hgetall(scope[keys.MODELQ_TASK_HEARTBEATS])
        *_, beats = await pipe.execute()
    stale = [task for task, beat in (beats or {}).items() if _float(beat) < cutoff]
    if stale:
        await client.hdel(scope[keys.MODELQ_TASK_HEARTBEATS], *stale)


def _float(value: bytes | str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
