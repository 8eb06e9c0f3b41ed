"""Every Redis key textstream uses, built in one place (as arq's constants.py).

ModelQ owns its own keys (`ml_tasks`, `task:{id}`, `servers`, `inflight:*`, ...);
they are fixed by the library and are not repeated here.
"""

from __future__ import annotations

PREFIX = "textstream"

#: Name of the ModelQ task; the worker registers a function with exactly this name.
TASK_NAME = "generate_completion"

#: Sorted set of worker ids scored by their last heartbeat (unix seconds).
WORKERS = f"{PREFIX}:workers"


def job_events(job_id: str) -> str:
    """Redis Stream holding one job's events, in order; entry ids are SSE ids."""
    return f"{PREFIX}:job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    """Flag a reader sets to ask the worker to stop generating the job."""
    return f"{PREFIX}:job:{job_id}:cancel"


def worker_info(worker_id: str) -> str:
    """JSON description of one live worker process (model, device, host)."""
    return f"{PREFIX}:worker:{worker_id}"
