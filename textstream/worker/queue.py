"""The worker's side of ModelQ, the queue our users chose: claiming a model's jobs,
holding custody of each until it is finished, and handing a dead worker's jobs
to another (api/queue.py is the API's side, which only enqueues).

We do NOT read results through ModelQ (`get_stream`/`get_result` poll with 1 s
sleeps); tokens travel on our own Redis Streams (worker/writer.py). ModelQ's
`import` logs every task's arguments (the prompt) at INFO: quiet_modelq_logging
caps it at WARNING.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from modelq import ModelQ
from modelq.app.redis_retry import _RedisWithRetry
from modelq.app.tasks import Task

from textstream import fairness, keys
from textstream.config import Settings
from textstream.connections import sync_client
from textstream.job import CompletionJob
from textstream.logs import quiet_modelq_logging
from textstream.transport.scripts import as_text

log = logging.getLogger(__name__)

__all__ = ["WorkerModelQ", "create_worker_modelq", "new_server_id", "tune_for_takeover"]


def new_server_id() -> str:
    """A unique ModelQ server id per worker process.

    ModelQ defaults to the hostname, so two processes on one host would share one
    identity (and one set of in-flight lists) and could run a task twice. No ':'
    inside: ModelQ splits `inflight:<server>:<n>` on it.
    """
    host = socket.gethostname().replace(":", "-")
    return f"{host}-{uuid.uuid4().hex[:8]}"


#: How often a worker writes its running tasks' heartbeats, and sweeps for tasks
#: whose heartbeat went stale. A killed worker's stream waits TAKEOVER_AFTER_SECONDS
#: less up to one interval, plus up to one sweep: 0.25 s keeps that within a quarter
#: second of the setting, for one small HSET and one SMEMBERS + HGETALL a worker
#: each time (bench/takeover.py measured how late a busy worker's beat runs).
HEARTBEAT_SECONDS = 0.25
#: The slower upkeep: the server registry's heartbeat, pruning dead servers and
#: recovering their custody lists (a takeover does not wait on these).
UPKEEP_SECONDS = 1.0


def tune_for_takeover(mq: ModelQ, settings: Settings) -> None:
    """ModelQ's liveness windows default to 30-300 s (modelq 1.0.19); a stream cannot
    wait that long.

    A running task's in-flight heartbeat is refreshed every HEARTBEAT_SECONDS; any
    worker's sweep (as often) gives a task back to the queue once its heartbeat is
    TAKEOVER_AFTER_SECONDS old (`requeue_stuck_processing_tasks`), moving it out of
    the dead worker's custody list atomically. The claim blocks 2 s at a time so a
    draining worker stops claiming promptly.
    """
    mq.HEARTBEAT_INTERVAL = HEARTBEAT_SECONDS
    mq.PRUNE_CHECK_INTERVAL = HEARTBEAT_SECONDS
    mq.INFLIGHT_STALE_AFTER = settings.takeover_after_seconds
    mq.PRUNE_TIMEOUT = max(10.0, 2 * settings.takeover_after_seconds)
    mq.BLPOP_TIMEOUT = 2
    # After a Redis outage ModelQ's threads retry every 15 s (+-50 %); come back sooner.
    _RedisWithRetry.RETRY_DELAY = 1


class ScopedRedis:
    """A Redis client (or pipeline, or script) that renames ModelQ's fixed key names
    to one model's (keys.queue_scope): ModelQ, which knows one queue, then serves
    that model's. Every other key (a task's own `task:{id}`, a worker's in-flight
    list) passes as is. ModelQ passes its fixed names as positional arguments, or
    as a script's `keys`; those are the only places renamed."""

    def __init__(self, target: Any, names: dict[str, str]) -> None:
        self._target = target
        self._names = names

    def _renamed(self, values: Any) -> list[Any]:
        return [self._names.get(v, v) if isinstance(v, str) else v for v in values]

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if "keys" in kwargs:
                kwargs["keys"] = self._renamed(kwargs["keys"])
            result = attr(*self._renamed(args), **kwargs)
            if name in ("pipeline", "register_script"):
                return ScopedRedis(result, self._names)
            return result

        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:  # a registered script
        if "keys" in kwargs:
            kwargs["keys"] = self._renamed(kwargs["keys"])
        return self._target(*args, **kwargs)

    def __enter__(self) -> ScopedRedis:
        self._target.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._target.__exit__(*exc)


def create_worker_modelq(
    settings: Settings,
    server_id: str,
    model: str,
    run_job: Callable[[CompletionJob], dict[str, Any]],
) -> WorkerModelQ:
    """The worker's ModelQ instance, on `model`'s queue, with the task registered."""
    quiet_modelq_logging()
    client = sync_client(settings, blocking_reads=True)
    mq = WorkerModelQ(
        redis_client=ScopedRedis(client, keys.queue_scope(model)),
        server_id=server_id,
        task_ttl=settings.job_ttl,  # its claim and requeue rewrite task:{id} with this TTL
    )
    mq.job_ttl = settings.job_ttl
    mq.model, mq.fair = model, settings.fair_queueing
    tune_for_takeover(mq, settings)

    def generate_completion(job: CompletionJob) -> dict[str, Any]:
        return run_job(job)

    assert generate_completion.__name__ == keys.TASK_NAME
    mq.task(schema=CompletionJob)(generate_completion)  # ModelQ's record of what we run
    mq.run_job = run_job
    return mq


#: A claimed task's bookkeeping in one round trip (ModelQ's own worker loop makes
#: four): mark it processing, take it out of the queued index, record it as
#: processing with its start time (a sweeper gives a task back from this record),
#: and publish its first in-flight heartbeat. Already marked processing:
#: - with the heartbeat this call would write, it is this call's own earlier try
#:   whose reply was lost: go on (1);
#: - with a fresh heartbeat, a live worker runs it (given back while still running):
#:   0, and that worker's records are left alone;
#: - with a stale or no heartbeat, nobody holds it (a sweeper giving it back in
#:   several steps, a worker gone): it is taken over (1).
#: KEYS: processing_tasks, queued_requests, task:{id}, task_heartbeats.
#: ARGV: task id, the task's record, its TTL, the start time, the stale age (s).
BEGIN_SCRIPT = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  local beat = redis.call('HGET', KEYS[4], ARGV[1])
  if beat == ARGV[4] then return 1 end
  local at = tonumber(beat)
  if at and tonumber(ARGV[4]) - at <= tonumber(ARGV[5]) then return 0 end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
return 1
"""

#: The end of a claimed task's custody, atomic: out of the custody list and, only
#: if it was still there (no sweeper gave it back to another worker meanwhile, whose
#: records these now are), no longer processing nor heartbeating, and its final
#: payload-free status stub. Retried after a lost reply, it finds the list without
#: the task and changes nothing.
#: KEYS: custody list, processing_tasks, task_heartbeats, task:{id}.
#: ARGV: the task's entry, task id, the stub ('' for none), the stub's TTL.
RELEASE_SCRIPT = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[3] ~= '' then
  redis.call('SREM', KEYS[2], ARGV[2])
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4])
end
return 1
"""


def _beat(name: str, write: Callable[[], None]) -> bool:
    """Write one heartbeat; False, logged by the error's type only, if it failed."""
    try:
        write()
    except Exception as exc:  # a Redis blip: the next tick tries again
        log.warning("queue %s: %s; retrying at the next beat", name, type(exc).__name__)
        return False
    return True


class WorkerModelQ(ModelQ):  # type: ignore[misc]
    """ModelQ as a worker runs it: ModelQ's queue, custody lists, heartbeats and
    sweepers, with its worker loop replaced by ours (`_serve`).

    ModelQ's loop (modelq 1.0.19) makes about seventeen Redis round trips per task (a thread's
    idle/busy status read and rewritten twice, each bookkeeping command on its own,
    the in-flight records cleared twice over); on a Redis carrying many short
    answers that is most of what a request costs it. Ours keeps ModelQ's records
    in three round trips: the claim (registering the custody list, then BLMOVE,
    pipelined), the claimed task's bookkeeping (BEGIN_SCRIPT), and its end
    (RELEASE_SCRIPT). ModelQ's sweepers and recovery read the same records.
    What ModelQ's loop offers that textstream does not use is left out: middleware,
    Sentry, retries (our task never raises) and its per-thread status in `servers`
    (its heartbeat keeps that entry alive; nothing reads the status). An entry that
    is not a task of ours is dropped, not given back to circle (a queue is one
    model's, and only textstream writes it).

    Nothing keeps a prompt past JOB_TTL: ModelQ's final write stores the whole task
    (payload, so the prompt) in `task:{id}` for 24 h and `task_result:{id}` for 1 h,
    and its history for 24 h. Here the final write keeps only a payload-free status
    stub in `task:{id}` (its sweepers read the status there, so a finished job is
    never revived), expiring JOB_TTL after the job was created; no result, no history,
    no `modelq_errors.log`.

    Custody survives a Redis that restarts empty: ModelQ registers a thread's
    in-flight list once, when the thread starts, so after such a restart the list it
    recreates is unknown to every sweeper, and when the worker is later killed the
    job and its prompt stay there forever. Here every claim registers the list, and
    every heartbeat registers them again.
    """

    job_ttl = 3600
    #: How long a queue thread waits before trying Redis again after an error.
    RETRY_SECONDS = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._custody_keys: set[str] = set()
        #: Set by a stopping worker: its threads stop claiming. (ModelQ's own switch,
        #: `worker_healthy`, logs a warning per thread every 5 s while draining.)
        self.draining = threading.Event()
        self._stopped = threading.Event()
        #: What runs a claimed job (set by create_worker_modelq).
        self.run_job: Callable[[CompletionJob], Any] | None = None
        super().__init__(*args, **kwargs)
        self._begin = self.redis_client.register_script(BEGIN_SCRIPT)
        self._end = self.redis_client.register_script(RELEASE_SCRIPT)
        self._fair_claim = self.redis_client.register_script(fairness.CLAIM_SCRIPT)
        self._settle = self.redis_client.register_script(fairness.SETTLE_SCRIPT)
        self._settle_tokens = self.redis_client.register_script(fairness.SETTLE_TOKENS_SCRIPT)
        #: Seconds Redis's clock is ahead of this host's (_sync_clock).
        self._clock_offset = 0.0
        self._clock_synced = False
        #: The served model whose queue this is, and whether its claims follow the
        #: fair order (create_worker_modelq).
        self.model = ""
        self.fair = True

    def start_workers(self, no_of_workers: int = 1) -> None:
        """ModelQ's start-up (recover this server id's leftovers, then its heartbeat
        and sweeper threads) and `no_of_workers` threads of our loop. ModelQ's
        delayed-task thread is not started: its delayed tasks are retries, and ours
        never retry (a second poll of Redis every second, for nothing)."""
        if any(thread.is_alive() for thread in self.worker_threads):
            return
        self._sync_clock()
        self.recover_abandoned_inflight_tasks(include_self=True)
        targets: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (self._heartbeat_loop, ()),
            (self._pruning_loop, ()),
        ]
        targets += [(self._serve, (n,)) for n in range(no_of_workers)]
        for target, args in targets:
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            self.worker_threads.append(thread)

    def stop(self) -> None:
        """End every thread start_workers started (each within a claim's block):
        for tests and embedders; a worker process just exits after draining."""
        self.draining.set()
        self._stopped.set()

    @contextlib.contextmanager
    def _guarded_iteration(self, loop_name: str) -> Iterator[None]:
        """ModelQ's, logging the error's type only: redis-py (4.6) puts a failed pipeline's
        commands in its message, and a sweeper's give-back pipeline holds the task,
        prompt included."""
        try:
            yield
        except Exception as exc:  # a loop must outlive any body error
            log.error("queue %s loop: %s; continuing", loop_name, type(exc).__name__)
            self._stopped.wait(self.BACKGROUND_LOOP_BACKOFF)

    def _heartbeat_loop(self) -> None:  # ModelQ's, stoppable; the registry's less often
        """A failed beat is tried again at the next tick, never after a back-off: a
        running job whose beats pause for TAKEOVER_AFTER_SECONDS is given away."""
        upkeep = 0.0
        while not self._stopped.is_set():
            if time.monotonic() >= upkeep and _beat("heartbeat", self.heartbeat):
                upkeep = time.monotonic() + UPKEEP_SECONDS
            _beat("in-flight heartbeat", self._publish_inflight_heartbeats)
            self._stopped.wait(self.HEARTBEAT_INTERVAL)

    def _pruning_loop(self) -> None:  # ModelQ's, stoppable; the stale-heartbeat sweep first
        upkeep = 0.0
        while not self._stopped.is_set():
            with self._guarded_iteration("pruning"):
                if time.monotonic() >= upkeep:
                    upkeep = time.monotonic() + UPKEEP_SECONDS
                    self._sync_clock()
                    self.prune_inactive_servers(timeout_seconds=self.PRUNE_TIMEOUT)
                    self.recover_abandoned_inflight_tasks()
                self.requeue_stuck_processing_tasks(threshold=self.INFLIGHT_STALE_AFTER)
            self._stopped.wait(self.PRUNE_CHECK_INTERVAL)

    def _sync_clock(self) -> None:
        """Measure how far Redis's clock is ahead of this host's (`_clock_offset`).

        A heartbeat is stamped by one host and aged by another's sweeper: on their
        own clocks, hosts that disagree by more than TAKEOVER_AFTER_SECONDS less a
        beat would give a live worker's jobs away at every sweep (or keep a dead
        one's). Stamped and aged on Redis's clock, they agree to a round trip."""
        best: tuple[float, float] | None = None  # (round trip, offset)
        for _ in range(3):  # the fastest of three: a GC pause mid-call skews one
            before = time.time()
            seconds, micros = self.redis_client.time()
            after = time.time()
            sample = (after - before, seconds + micros / 1e6 - (before + after) / 2)
            best = sample if best is None or sample < best else best
        assert best is not None
        if best[0] < 0.1 or not self._clock_synced:  # a slow round trip: keep the last
            self._clock_offset, self._clock_synced = best[1], True

    def redis_now(self) -> float:
        """Now on Redis's clock (as last measured): what heartbeats are stamped with."""
        return time.time() + self._clock_offset

    def prune_inactive_servers(self, timeout_seconds: float | None = None) -> None:
        """ModelQ's, aging the registry's beats on Redis's clock: a server pruned is
        one whose custody lists `recover_abandoned_inflight_tasks` gives back."""
        timeout = self.PRUNE_TIMEOUT if timeout_seconds is None else timeout_seconds
        now = self.redis_now()
        for server, raw in (self.redis_client.hgetall("servers") or {}).items():
            try:
                beat = float(json.loads(raw).get("last_heartbeat") or 0)
            except (ValueError, TypeError, AttributeError):
                continue  # not ModelQ's record: kept, as ModelQ keeps it
            if now - beat > timeout:
                self.redis_client.hdel("servers", server)
                log.info("pruned queue server %s (silent %.0f s)", as_text(server), now - beat)

    def _publish_inflight_heartbeats(self) -> None:
        """ModelQ's, stamped on Redis's clock (_sync_clock)."""
        with self._inflight_lock:
            running = list(self._inflight_tasks)
        if running:
            now = repr(self.redis_now())
            self.redis_client.hset(self.INFLIGHT_HEARTBEAT_KEY, mapping=dict.fromkeys(running, now))

    def _inflight_heartbeats(self) -> dict[str, float]:
        """ModelQ's, moved onto this host's clock: its sweeper ages them with
        time.time()."""
        raw = self.redis_client.hgetall(self.INFLIGHT_HEARTBEAT_KEY) or {}
        beats: dict[str, float] = {}
        for key, value in raw.items():
            try:
                beats[as_text(key)] = float(value) - self._clock_offset
            except ValueError:
                continue
        return beats

    def _serve(self, n: int) -> None:
        """One queue thread: claim a task, run it, release it; until stopped.

        A claim that failed may have moved a task into this thread's custody list
        with its reply lost (ModelQ's loop would claim the next and leave that one
        there while the worker lives): after a failed claim, the list is read
        first, and a task found there is run."""
        inflight_key = self._inflight_key(n)
        recheck = False
        while not self._stopped.is_set():
            try:
                if recheck:
                    task_json = self.redis_client.lindex(inflight_key, 0)
                    recheck = False
                else:
                    task_json = self._claim_task(inflight_key)
                if task_json:
                    self._process_claimed(task_json, inflight_key)
            except Exception as exc:  # a queue thread outlives any error, as ModelQ's
                log.warning("queue thread %d: %s; retrying", n, type(exc).__name__)
                recheck = True
                self._stopped.wait(self.RETRY_SECONDS)

    def _claim_task(self, inflight_key: str) -> Any:
        if self.draining.is_set():
            self._stopped.wait(0.5)
            return None
        self._custody_keys.add(inflight_key)
        if not self._blmove_supported():  # Redis < 6.2: ModelQ's polled claim
            self.redis_client.sadd(self.INFLIGHT_REGISTRY, inflight_key)
            return super()._claim_task(inflight_key)
        pipe = self.redis_client.pipeline(transaction=False)
        pipe.sadd(self.INFLIGHT_REGISTRY, inflight_key)
        pipe.blmove(keys.MODELQ_QUEUE, inflight_key, self.BLPOP_TIMEOUT, "LEFT", "RIGHT")
        _, task_json = pipe.execute()
        return self._fair_pick(task_json, inflight_key) if task_json else task_json

    def _fair_pick(self, head: bytes | str, inflight_key: str) -> Any:
        """The queue's head, now in custody, swapped for the job the fair order
        says is next (fairness.CLAIM_SCRIPT). If this call fails, the head stays in
        custody and `_serve` runs it (it reads the list after a failed claim)."""
        try:
            task_id = json.loads(head)["task_id"]
        except (ValueError, TypeError, KeyError):
            return head  # not a task: _process_claimed drops it
        model = self.model
        if not self.fair:
            return head
        return self._fair_claim(
            keys=[
                keys.MODELQ_QUEUE,
                inflight_key,
                keys.fair_backlog(model),
                keys.fair_counters(model),
                keys.fair_owners(model),
                keys.fair_floor(model),
            ],
            args=[head, str(task_id), keys.fair_waiting_prefix(model), keys.modelq_task("")],
        )

    def _settle_charge(self, job: CompletionJob, result: Any) -> None:
        """Replace the estimates made for the job by what it cost: the fair share's
        charged at claim (fairness.py) and the tokens reserved against its caller's
        TOKEN_RATE_LIMIT. A job that ended without usage (an error, a hand-over)
        keeps the estimates."""
        usage = result.get("usage") if isinstance(result, dict) else None
        if not usage:
            return
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        try:
            if job.caller:
                self._settle(
                    keys=[keys.fair_counters(self.model), keys.fair_backlog(self.model)],
                    args=[
                        job.caller,
                        repr(fairness.cost(prompt, completion) / job.weight - job.charge),
                    ],
                )
            if job.quota_key:
                used = int(prompt) + int(completion)
                self._settle_tokens(keys=[job.quota_key], args=[used - job.quota_tokens])
        except Exception as exc:  # a share slightly off; the job itself is done
            log.warning("job=%s: could not settle its share: %s", job.job_id, type(exc).__name__)

    def _persist(self, what: str, call: Callable[[], Any]) -> Any:
        """`call` until Redis takes it: a claimed task's records must neither be
        lost (the task would sit in custody, never run) nor half written. A stopped
        instance gives up (the task stays in custody, for a sweeper)."""
        while True:
            try:
                return call()
            except Exception as exc:
                log.warning("could not %s yet: %s", what, type(exc).__name__)
                if self._stopped.wait(self.RETRY_SECONDS):
                    raise

    def _process_claimed(self, task_json: bytes | str, inflight_key: str) -> None:
        try:
            task_dict = json.loads(task_json)
            task = Task.from_dict(task_dict)
            if not (isinstance(task.task_id, str) and isinstance(task.task_name, str)):
                raise TypeError("task_id and task_name must be text")
        except (ValueError, TypeError, KeyError, AttributeError):
            # Not a task at all (nothing of ours writes one): out of custody, or the
            # thread would find it there again after every failed claim. Never logged:
            # it may hold a prompt.
            log.error("dropped a queue entry that is not a task (%d bytes)", len(task_json))
            self._release(inflight_key, task_json)
            return
        if task.task_name not in self.allowed_tasks:
            # A queue is one model's, and textstream's only: a task it does not run has
            # no server to go to (given back, as ModelQ's loop does, it would circle).
            log.error("dropped a queued task this worker does not run (%.40r)", task.task_name)
            self._release(inflight_key, task_json)
            return
        started_at = time.time()
        task_dict.update(status="processing", started_at=started_at)
        task.started_at = started_at
        fresh = self._persist(
            "start a claimed job",
            lambda: self._begin(
                keys=[
                    keys.MODELQ_PROCESSING,
                    keys.MODELQ_QUEUED_INDEX,
                    keys.modelq_task(task.task_id),
                    self.INFLIGHT_HEARTBEAT_KEY,
                ],
                args=[
                    task.task_id,
                    json.dumps(task_dict),
                    self.task_ttl,
                    repr(self.redis_now()),  # its first heartbeat, and the age's now
                    self.INFLIGHT_STALE_AFTER,
                ],
            ),
        )
        if not int(fresh):
            # Given back while a live worker still runs it (its heartbeat is fresh):
            # that worker's records are left alone (they are the job's way back to
            # the queue should it die), and this claim is dropped.
            log.warning("job=%s is already running on another worker; skipped", task.task_id)
            self._release(inflight_key, task_json)
            return
        with self._inflight_lock:
            self._inflight_tasks[task.task_id] = started_at
        task.status = "failed"
        try:
            assert self.run_job is not None, "create_worker_modelq sets run_job"
            job = CompletionJob.model_validate(task.payload["data"])
            self._settle_charge(job, self.run_job(job))
            task.status = "completed"
        except Exception as exc:  # never the payload (the prompt) in a log
            log.error("job=%s: the queue task raised %s", task.task_id, type(exc).__name__)
        finally:
            try:
                self._release(inflight_key, task_json, task)
            finally:  # heartbeating until released: else a sweeper would give it back
                with self._inflight_lock:
                    self._inflight_tasks.pop(task.task_id, None)

    def _release(self, inflight_key: str, task_json: bytes | str, task: Task | None = None) -> None:
        """End custody of a claimed task (RELEASE_SCRIPT): with `task`, also its
        processing records and final stub, if it was still ours. Persisted: until
        Redis takes it, a sweeper would give the task back and run it again."""
        stub, ttl = self._final_stub(task) if task is not None else ("", 0)
        task_id = task.task_id if task is not None else ""
        self._persist(
            "release a claimed job",
            lambda: self._end(
                keys=[
                    inflight_key,
                    keys.MODELQ_PROCESSING,
                    self.INFLIGHT_HEARTBEAT_KEY,
                    keys.modelq_task(task_id),
                ],
                args=[task_json, task_id, stub, ttl],
            ),
        )

    def _final_stub(self, task: Task) -> tuple[str, int]:
        """The payload-free `task:{id}` a finished task leaves, and its TTL (what is
        left of JOB_TTL since the job was created)."""
        stub = {
            "task_id": task.task_id,
            "task_name": task.task_name,
            "status": task.status,
            "created_at": task.created_at,
            "queued_at": getattr(task, "queued_at", None),
            "started_at": task.started_at,
            "finished_at": time.time(),
        }
        remaining = int((task.created_at or time.time()) + self.job_ttl - time.time())
        return json.dumps(stub), max(1, remaining)

    def heartbeat(self) -> None:
        """ModelQ's server registry beat, stamped on Redis's clock (_sync_clock), and
        our custody lists registered again."""
        raw = self.redis_client.hget("servers", self.server_id)
        if not raw:
            self.register_server()  # ModelQ's record (host, system info); stamped below
            raw = self.redis_client.hget("servers", self.server_id) or b"{}"
        data = json.loads(raw)
        data["last_heartbeat"] = self.redis_now()
        self.redis_client.hset("servers", self.server_id, json.dumps(data))
        if self._custody_keys:
            self.redis_client.sadd(self.INFLIGHT_REGISTRY, *self._custody_keys)

    def _update_task_history(self, task_id: str, task_dict: dict[str, Any]) -> None:
        return None
