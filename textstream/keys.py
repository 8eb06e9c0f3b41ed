"""Every Redis key textstream uses, built in one place (as arq's constants.py).

Two roles (config.py): the job streams and their state hashes (`job_events`,
`job_state`) live on STREAMS_REDIS_URL, which may be a Redis Cluster; every other
key lives on REDIS_URL. By default both are the same Redis.

ModelQ fixes its own key names (`ml_tasks`, `servers`, `task:{id}`, ...). The
per-queue ones are scoped to a model here (`queue_key`): worker/queue.py hands
ModelQ a client that renames them, so each served model has a queue of its own.
"""

from __future__ import annotations

PREFIX = "textstream"

#: Name of the ModelQ task; the worker registers a function with exactly this name.
TASK_NAME = "generate_completion"

#: ModelQ's queue (a list of task blobs) and its index of queued task ids by time.
MODELQ_QUEUE = "ml_tasks"
MODELQ_QUEUED_INDEX = "queued_requests"
#: ModelQ's registry of worker servers (hash server_id -> JSON).
MODELQ_SERVERS = "servers"
#: ModelQ's set of tasks being processed, and their in-flight heartbeats (a hash).
MODELQ_PROCESSING = "processing_tasks"
MODELQ_TASK_HEARTBEATS = "task_heartbeats"
#: ModelQ's record of every task (a sorted set that only grows unless trimmed).
MODELQ_TASK_HISTORY = "task_history"
#: Every fixed name ModelQ uses for one queue's state: its list, indexes, custody
#: registry, in-flight heartbeats, server registry. Each model gets its own set, so
#: a job waits only for its model's workers, and a worker's sweeps (requeueing a
#: dead worker's jobs) only ever touch its own model's jobs.
MODELQ_QUEUE_NAMES = (
    MODELQ_QUEUE,
    MODELQ_QUEUED_INDEX,
    MODELQ_SERVERS,
    MODELQ_PROCESSING,
    "inflight_lists",
    MODELQ_TASK_HEARTBEATS,
    "delayed_tasks",
    MODELQ_TASK_HISTORY,
)


def queue_key(model: str, name: str) -> str:
    """ModelQ's key `name` (one of MODELQ_QUEUE_NAMES) for the queue of `model`."""
    return f"{PREFIX}:queue:{model}:{name}"


def queue_scope(model: str) -> dict[str, str]:
    return {name: queue_key(model, name) for name in MODELQ_QUEUE_NAMES}


#: The fair order of a model's queue (fairness.py).
def fair_backlog(model: str) -> str:
    """Sorted set: caller -> its counter, for the callers with jobs waiting."""
    return queue_key(model, "fair:backlog")


def fair_counters(model: str) -> str:
    """Hash: caller -> its counter (callers not waiting too)."""
    return queue_key(model, "fair:counters")


def fair_owners(model: str) -> str:
    """Hash: waiting job id -> `<charge> <caller>` (the estimate charged at claim)."""
    return queue_key(model, "fair:jobs")


def fair_floor(model: str) -> str:
    """The counter of the caller whose job was claimed last."""
    return queue_key(model, "fair:floor")


def fair_waiting_prefix(model: str) -> str:
    """`<prefix><caller>`: sorted set of that caller's waiting job ids."""
    return queue_key(model, "fair:waiting:")


def queue_deadlines(model: str) -> str:
    """Sorted set: the jobs of `model`'s queue that asked to wait at most so long
    (queue_timeout), by the time they must have started (api/janitor.py ends them)."""
    return f"{PREFIX}:queue:{model}:deadlines"


def modelq_task(task_id: str) -> str:
    """ModelQ's record of one task (its task wrapper writes it after enqueueing)."""
    return f"task:{task_id}"


#: Hash: every model a worker has served -> JSON of how (source, window, format,
#: last seen), kept by the heartbeats: requests may name a model whose workers are
#: all down for now, and wait for them.
MODELS = f"{PREFIX}:models"

#: Sorted set of worker ids scored by their last heartbeat (unix seconds).
WORKERS = f"{PREFIX}:workers"


def job_tag(job_id: str) -> str:
    """The hash tag of a job's keys: the first 4 characters of its id.

    Everything one job's scripts touch (its stream and its state) shares this tag,
    so on a Redis Cluster they live in one slot and a script may touch both. The
    tag is a prefix of the id, not the whole id, so that jobs can share slots: a
    cluster refuses a multi-key XREAD across slots (CROSSSLOT), and the API
    chooses ids whose tag lands on a given node (transport/placement.py), so one
    XREAD per node reads all of that node's streams."""
    return job_id[:4]


def job_events(job_id: str) -> str:
    """Redis Stream holding one job's events, in order; entry ids are SSE ids."""
    return f"{PREFIX}:job:{{{job_tag(job_id)}}}:{job_id}:events"


def job_state(job_id: str) -> str:
    """Hash of a job's control state: `owner` (the worker attempt allowed to write),
    `terminal` (set once by the event that ended it), `cancel` (a stop request,
    holding Redis's clock in ms when it was made: comparable with entry ids)."""
    return f"{PREFIX}:job:{{{job_tag(job_id)}}}:{job_id}:state"


def worker_info(worker_id: str) -> str:
    """JSON description of one live worker process (model, device, host)."""
    return f"{PREFIX}:worker:{worker_id}"


def cache_entry(digest: str) -> str:
    """Response cache: SHA-256 of model + prompt + parameters -> the job whose stream
    holds the answer (kept for CACHE_TTL)."""
    return f"{PREFIX}:cache:{digest}"


def stored_response(job_id: str) -> str:
    """A /v1/responses response's request and conversation (JSON), for retrieving it
    and for `previous_response_id`; on the queue's Redis, kept RESPONSES_TTL."""
    return f"{PREFIX}:response:{job_id}"


def rate_window(identity: str, window: int) -> str:
    """Requests counted for one caller (a key's hash, or an IP) in one minute."""
    return f"{PREFIX}:rate:{identity}:{window}"


def token_window(identity: str, window: int) -> str:
    """Tokens reserved or used by one caller in one minute (TOKEN_RATE_LIMIT)."""
    return f"{PREFIX}:tokens:{identity}:{window}"


def open_streams(identity: str) -> str:
    """Sorted set of one caller's open streams, scored by when their lease lapses."""
    return f"{PREFIX}:streams:{identity}"


#: Sorted set of live API processes (ids), scored by when their lease lapses.
API_PROCESSES = f"{PREFIX}:api:processes"


def api_claims(process_id: str) -> str:
    """Sorted set of the jobs one API process holds reader claims on, scored by when
    each lapses anyway (the job's deadline): what to release if the process dies."""
    return f"{PREFIX}:api:{process_id}:claims"


#: Metrics: request counts (hash "METHOD route|status" -> n), counters, histograms.
METRICS_REQUESTS = f"{PREFIX}:metrics:requests"
METRICS_COUNTERS = f"{PREFIX}:metrics:counters"


def metrics_histogram(name: str, model: str) -> str:
    """Hash: bucket upper bound -> count (not cumulative), plus `sum` and `count`."""
    return f"{PREFIX}:metrics:hist:{name}:{model}"
