"""A worker's job figures (time to first token, latencies, token counts), on
their way to Redis's histograms (textstream/metrics.py names them)."""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import redis

from textstream import keys
from textstream.metrics import HISTOGRAMS

log = logging.getLogger(__name__)


@dataclass
class JobTimings:
    """One job's timeline, as a worker sees it (unix seconds)."""

    enqueued_at: float
    started_at: float = field(default_factory=time.time)
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def token(self) -> None:
        self.token_times.append(time.time())

    def observations(self, ended_at: float) -> dict[str, list[float]]:
        obs: dict[str, list[float]] = {
            "e2e_request_latency_seconds": [ended_at - self.enqueued_at],
            "request_queue_time_seconds": [max(0.0, self.started_at - self.enqueued_at)],
            "request_generation_tokens": [float(self.completion_tokens)],
        }
        if self.token_times:
            obs["time_to_first_token_seconds"] = [self.token_times[0] - self.enqueued_at]
            times = self.token_times
            obs["inter_token_latency_seconds"] = [b - a for a, b in pairwise(times)]
        return obs


#: Amounts to add to Redis hashes: (key, field, whether a float) -> amount.
Figures = defaultdict[tuple[str, str, bool], float]


def _merge(into: Figures, figures: Figures) -> None:
    for name, amount in figures.items():
        into[name] += amount


class JobMetrics:
    """A worker's finished jobs' figures, on their way to Redis's histograms.

    A job's figures are 18 commands. Written one job at a time, that was a round
    trip and ~37 µs of Redis CPU per job, a tenth of what a short answer costs
    Redis. Here a job's figures go at once when the last write is `every` seconds
    old (a lone job shows in /metrics at once), else they are gathered and written
    together `every` seconds after the last write, by one thread: any number of
    jobs in one pipeline. Figures an unreachable Redis refused are kept (a bounded
    set: histogram buckets by model) and go with the next write; after a timeout or
    an error reply they are dropped, since some may have been added (counted once
    at most, then). A worker that dies loses at most `every` seconds of them. A
    figure that is not a finite number (a clock stepped back or forth mid-job) is
    left out, not allowed to make Redis refuse the others. `after_write` runs after
    each write (the worker's registry beat: /workers sees its new decode rate with
    its figures).
    """

    def __init__(
        self,
        client: redis.Redis,
        every: float = 0.25,
        after_write: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._every = every
        self._after_write = after_write
        self._lock = threading.Lock()
        self._pending: Figures = defaultdict(float)
        self._last = float("-inf")
        self._due = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def add(self, timings: JobTimings, success: bool, model: str) -> None:
        """Count one finished job."""
        figures: Figures = defaultdict(float)
        for name, observed in timings.observations(time.time()).items():
            values = [v for v in observed if math.isfinite(v) and v >= 0]
            if not values:
                continue
            bounds = HISTOGRAMS[name][1]
            key = keys.metrics_histogram(name, model)
            for value in values:
                figures[(key, str(bisect.bisect_left(bounds, value)), False)] += 1
            figures[(key, "sum", True)] += sum(values)
            figures[(key, "count", False)] += len(values)
        outcome = "request_success" if success else "request_failure"
        for name, amount in (
            ("generation_tokens", timings.completion_tokens),
            ("prompt_tokens", timings.prompt_tokens),
            (outcome, 1),
        ):
            figures[(keys.METRICS_COUNTERS, f"{name}|{model}", False)] += amount
        with self._lock:
            _merge(self._pending, figures)
            now = time.monotonic() - self._last >= self._every
        if now:
            self.write()
        else:
            self._due.set()

    def write(self) -> bool:
        """Write what is pending now; False (and kept for the next) if Redis failed."""
        with self._lock:
            pending, self._pending = self._pending, defaultdict(float)
            self._last = time.monotonic()
        if pending:
            pipe = self._client.pipeline(transaction=False)
            for (key, name, is_float), amount in pending.items():
                if is_float:
                    pipe.hincrbyfloat(key, name, amount)
                else:
                    pipe.hincrby(key, name, int(amount))
            try:
                pipe.execute()
            except redis.ConnectionError as exc:  # Redis unreachable: kept for the next
                with self._lock:
                    _merge(self._pending, pending)
                self._due.set()
                log.warning("could not record metrics yet: %s", type(exc).__name__)
                return False
            except redis.RedisError as exc:
                # A timeout or an error reply: some or all may have been added, and
                # adding them again could count them twice. Dropped.
                log.warning("metrics of some jobs lost: %s", type(exc).__name__)
                return False
        if self._after_write is not None and not self._closed:
            try:
                self._after_write()
            except Exception as exc:  # never fails the job whose figures these are
                log.warning("could not publish the worker's state: %s", type(exc).__name__)
        return True

    def close(self) -> None:
        """Write what is pending, for the last time with `after_write` (a stopping
        worker deregisters after this, and must not be announced again)."""
        self.write()
        self._closed = True

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            time.sleep(max(0.0, self._last + self._every - time.monotonic()))
            try:
                self.write()
            except Exception as exc:  # the thread outlives anything a write raises
                log.error("metrics write failed: %s", type(exc).__name__)
