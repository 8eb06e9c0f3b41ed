"""Live workers, as the API sees them: each worker process heartbeats its identity
(model, device, host, slots) into Redis; entries older than a few heartbeats are
dead and ignored. ModelQ keeps its own `servers` hash, but it knows nothing of the
model, and its staleness window (minutes) is too slow for `/health`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

import redis
import redis.asyncio as aioredis

from textstream import keys

log = logging.getLogger(__name__)

#: A worker is considered gone after this many missed heartbeats.
MISSED_HEARTBEATS = 3
#: How long a model stays known after its last worker's last heartbeat.
KNOWN_MODEL_SECONDS = 7 * 86400


@dataclass
class WorkerInfo:
    worker_id: str
    host: str
    pid: int
    model: str
    device: str
    slots: int
    busy: int = 0
    #: Slots are rows of one continuous batch (else separate decode loops), and the
    #: most requests decoded in one step so far.
    batching: bool = False
    peak_batch: int = 0
    #: How the model was named when loaded (MODEL_ID or the fallback), its context
    #: window and prompt format: the API uses them to count prompt tokens.
    model_source: str = ""
    context_length: int = 0
    prompt_format: str = "auto"
    load_seconds: float = 0.0
    #: The name this deployment's configuration told the worker to serve, when it
    #: serves another (MODEL_ID could not be loaded, MODEL_FALLBACK was): requests
    #: and queued jobs for that name go to this worker's model (api/models.py).
    fallback_for: str = ""
    #: Decode rate of the worker's last finished job (tokens/s).
    last_tokens_per_s: float = 0.0
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = field(default_factory=time.time)

    def model_record(self) -> dict[str, object]:
        return {
            "source": self.model_source,
            "context_length": self.context_length,
            "prompt_format": self.prompt_format,
            "seen_at": self.heartbeat_at,
        }


@dataclass(frozen=True)
class KnownModel:
    """A model some worker served within KNOWN_MODEL_SECONDS."""

    name: str
    source: str
    context_length: int
    prompt_format: str
    seen_at: float


async def known_models(client: aioredis.Redis) -> dict[str, KnownModel]:
    """Every model served lately, live or not (the ones long gone are pruned)."""
    raw = await client.hgetall(keys.MODELS)
    cutoff, known, stale = time.time() - KNOWN_MODEL_SECONDS, {}, []
    for name, body in raw.items():
        record = json.loads(body)
        model = KnownModel(name=name.decode(), **record)
        if model.seen_at < cutoff:
            stale.append(name)
        else:
            known[model.name] = model
    if stale:
        await client.hdel(keys.MODELS, *stale)
    return known


class WorkerHeartbeat:
    """Publishes a worker's `WorkerInfo` every `interval` seconds from a daemon thread.

    Redis errors are logged and retried on the next beat: a worker outlives outages.
    """

    def __init__(self, client: redis.Redis, info: WorkerInfo, interval: float) -> None:
        self._client = client
        self.info = info
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def job_started(self) -> None:
        with self._lock:
            self.info.busy += 1

    def job_finished(self) -> None:
        with self._lock:
            self.info.busy -= 1

    def beat(self) -> None:
        if self._stop.is_set():
            return  # deregistered: a late beat (a metrics write) must not re-announce it
        with self._lock:
            self.info.heartbeat_at = time.time()
            body = json.dumps(asdict(self.info))
        ttl = max(1, int(self._interval * MISSED_HEARTBEATS) + 1)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(keys.worker_info(self.info.worker_id), body, ex=ttl)
        pipe.zadd(keys.WORKERS, {self.info.worker_id: self.info.heartbeat_at})
        # Dead workers' entries are pruned here, by the living, so that a reader
        # (every submission resolving its model) never writes: under CLIENT PAUSE
        # WRITE or a read-only replica a submission must still reach its turn.
        # Generously: readers filter by score anyway, and a pruning worker whose clock
        # runs ahead must not drop the living.
        stale = self.info.heartbeat_at - max(PRUNE_AFTER_SECONDS, 10 * self._interval)
        pipe.zremrangebyscore(keys.WORKERS, "-inf", stale)
        pipe.hset(keys.MODELS, self.info.model, json.dumps(self.info.model_record()))
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("worker heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stop beating and remove this worker from the registry."""
        self._stop.set()
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(keys.worker_info(self.info.worker_id))
            pipe.zrem(keys.WORKERS, self.info.worker_id)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not deregister worker: %s", exc)


async def live_workers(client: aioredis.Redis) -> list[WorkerInfo]:
    """Workers whose last heartbeat is recent, read without writing (the living
    workers prune the stale entries: Heartbeat.beat).

    Recent means its info key has not expired: Redis ages that TTL on its own
    clock, where a score written by the worker's host and compared with this
    host's clock would count a worker on a host a few seconds behind as dead."""
    ids = [i.decode() for i in await client.zrange(keys.WORKERS, 0, -1)]
    if not ids:
        return []
    bodies = await client.mget([keys.worker_info(i) for i in ids])
    return [WorkerInfo(**json.loads(body)) for body in bodies if body]


#: A registry entry this much older than the pruning worker's own beat is dead.
PRUNE_AFTER_SECONDS = 60.0


class LiveModels:
    """The models live workers serve, as a submission resolves its model: read from
    the registry at most once per `max_age` seconds while some are live (one read
    shared by every submission waiting for it), not twice per submission (in a
    burst of 1,000 streams that lookup was a tenth of the API's CPU). An empty
    answer is not kept: a worker that has just started is seen at once. A worker
    that died is still listed for up to `max_age`, as the registry itself lists it
    for up to its missed heartbeats: its model's jobs then wait for a worker."""

    def __init__(self, max_age: float = 1.0) -> None:
        self._max_age = max_age
        self._models: list[str] = []
        #: name -> the model served in its place (WorkerInfo.fallback_for), for
        #: names no live worker serves itself; as fresh as the model list.
        self.aliases: dict[str, str] = {}
        self._read_at = float("-inf")
        self._reading: asyncio.Future[list[str]] | None = None

    async def get(self, client: aioredis.Redis) -> list[str]:
        if self._models and time.monotonic() - self._read_at < self._max_age:
            return self._models
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read(client))
        reading = self._reading
        return await asyncio.shield(reading)

    async def _read(self, client: aioredis.Redis) -> list[str]:
        try:
            workers = await live_workers(client)
            models = sorted({w.model for w in workers})
            self.aliases = {
                w.fallback_for: w.model
                for w in workers
                if w.fallback_for and w.fallback_for not in models
            }
            self._models, self._read_at = models, time.monotonic()
            return models
        finally:
            self._reading = None


def live_workers_now(client: redis.Redis) -> list[WorkerInfo]:
    """The registered workers, read with a sync client (`textstream serve` watching
    its own workers from a thread): who can answer, and how many jobs each runs."""
    ids = [i.decode() for i in client.zrange(keys.WORKERS, 0, -1)]
    if not ids:
        return []
    bodies = client.mget([keys.worker_info(i) for i in ids])
    return [WorkerInfo(**json.loads(body)) for body in bodies if body]
