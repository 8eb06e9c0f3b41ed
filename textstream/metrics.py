"""Prometheus metrics that are right however many API processes there are.

Workers add their finished jobs' figures to histograms in Redis (`JobMetrics`:
one pipeline for all the jobs a worker finished within a quarter of a second),
API processes count requests there, and `/metrics` renders what Redis holds, so
every API process answers with the same global figures. Names follow vLLM's
where they mean the same
(`vllm:time_to_first_token_seconds` -> `textstream_time_to_first_token_seconds`).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from textstream import keys
from textstream.registry import WorkerInfo

log = logging.getLogger(__name__)

PREFIX = "textstream_"
LATENCY = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
DURATION = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
]
HISTOGRAMS: dict[str, tuple[str, list[float]]] = {
    "time_to_first_token_seconds": ("Time from enqueue to the first token.", LATENCY),
    "inter_token_latency_seconds": ("Time between consecutive token events.", LATENCY),
    "e2e_request_latency_seconds": ("Time from enqueue to the end of the job.", DURATION),
    "request_queue_time_seconds": ("Time a job waited before a worker started it.", DURATION),
    "request_generation_tokens": (
        "Tokens generated per job.",
        [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0],
    ),
}
COUNTERS = {
    "generation_tokens": "Tokens generated, all jobs.",
    "prompt_tokens": "Prompt tokens processed, all jobs.",
    "request_success": "Jobs that ended with `done`.",
    "request_failure": "Jobs that ended with an error (cancelled included).",
}


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


class RequestCounts:
    """An API process's HTTP request counts, on their way to Redis: as JobMetrics,
    a lone request's count goes at once, and a busy stretch's go together `every`
    seconds after the last write, in one pipeline (a round trip per request was a
    twentieth of the API's CPU in a burst). Counts kept from an unreachable Redis
    (or a cancelled write) go with a later write."""

    def __init__(self, every: float = 0.25) -> None:
        self._every = every
        self._pending: Counter[str] = Counter()
        self._last = float("-inf")
        self._later: asyncio.Task[None] | None = None

    async def add(self, client: aioredis.Redis, method: str, route: str, status: int) -> None:
        self._pending[f"{method} {route}|{status}"] += 1
        if self._later is not None:
            return  # a write is already due
        wait = self._last + self._every - time.monotonic()
        if wait <= 0:
            await self._write(client)
        else:
            self._later = asyncio.create_task(self._write_later(client, wait))
            self._later.add_done_callback(self._done)  # even if cancelled before it ran

    def _done(self, task: asyncio.Task[None]) -> None:
        if self._later is task:
            self._later = None

    async def _write_later(self, client: aioredis.Redis, wait: float) -> None:
        await asyncio.sleep(wait)
        await self._write(client)

    async def _write(self, client: aioredis.Redis) -> None:
        pending, self._pending = self._pending, Counter()
        self._last = time.monotonic()
        if not pending:
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                for name, count in pending.items():
                    pipe.hincrby(keys.METRICS_REQUESTS, name, count)
                await pipe.execute()
        except asyncio.CancelledError:
            self._pending.update(pending)
            raise
        except (redis.ConnectionError, OSError):
            self._pending.update(pending)  # kept: written with a later request's
        except redis.RedisError:
            pass  # some may have been added: not again (counted once at most)


def _decode(mapping: dict[Any, Any]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in mapping.items()}


class Snapshot(Collector):
    """Metric families built from one read of Redis (prometheus-client renders them).
    Job figures carry a `model` label; so do the queue and worker gauges."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def collect(self) -> Iterable[Any]:
        requests = CounterMetricFamily(
            PREFIX + "http_requests",
            "HTTP requests by route and status.",
            labels=["method", "route", "status"],
        )
        for label, value in self._data["requests"].items():
            request_line, _, status = label.rpartition("|")
            method, _, route = request_line.partition(" ")
            requests.add_metric([method, route, status], float(value))
        yield requests
        counters: dict[str, str] = self._data["counters"]
        for name, doc in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model"])
            for label, value in counters.items():
                counter, _, model = label.partition("|")
                if counter == name and model:
                    family.add_metric([model], float(value))
            yield family
        for name, (doc, bounds) in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(PREFIX + name, doc, labels=["model"])
            for model, raw in self._data["histograms"][name].items():
                buckets, total = self._buckets(bounds, raw)
                histogram.add_metric([model], buckets, total)
            yield histogram
        yield from self._gauges()

    @staticmethod
    def _buckets(bounds: list[float], raw: dict[str, str]) -> tuple[list[tuple[str, int]], float]:
        cumulative, running = [], 0
        for index, bound in enumerate([*bounds, float("inf")]):
            running += int(raw.get(str(index), 0))
            cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
        return cumulative, float(raw.get("sum", 0))

    def _gauges(self) -> Iterable[Any]:
        workers: list[WorkerInfo] = self._data["workers"]
        waiting = GaugeMetricFamily(
            PREFIX + "num_requests_waiting", "Jobs in the queue.", labels=["model"]
        )
        for model, length in self._data["queues"].items():
            waiting.add_metric([model], length)
        yield waiting
        running = GaugeMetricFamily(
            PREFIX + "num_requests_running", "Jobs being generated.", labels=["model"]
        )
        live = GaugeMetricFamily(PREFIX + "workers", "Live worker processes.", labels=["model"])
        for model in sorted({w.model for w in workers}):
            mine = [w for w in workers if w.model == model]
            running.add_metric([model], sum(w.busy for w in mine))
            live.add_metric([model], len(mine))
        yield running
        yield live
        load = GaugeMetricFamily(
            PREFIX + "model_load_seconds", "Model load time per worker.", labels=["worker", "model"]
        )
        rate = GaugeMetricFamily(
            PREFIX + "worker_generation_tokens_per_second",
            "Decode rate of each worker's last job.",
            labels=["worker", "model"],
        )
        for worker in workers:
            load.add_metric([worker.worker_id, worker.model], worker.load_seconds)
            rate.add_metric([worker.worker_id, worker.model], worker.last_tokens_per_s)
        yield load
        yield rate


async def render(
    client: aioredis.Redis, workers: list[WorkerInfo], queues: dict[str, int]
) -> bytes:
    """`queues`: each known model's waiting jobs; its models are the labels."""
    models = sorted(queues)
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.METRICS_REQUESTS)
        pipe.hgetall(keys.METRICS_COUNTERS)
        for name in HISTOGRAMS:
            for model in models:
                pipe.hgetall(keys.metrics_histogram(name, model))
        results = await pipe.execute()
    raw = iter(results[2:])
    histograms = {name: {model: _decode(next(raw)) for model in models} for name in HISTOGRAMS}
    data = {
        "requests": _decode(results[0]),
        "counters": _decode(results[1]),
        "histograms": histograms,
        "workers": workers,
        "queues": queues,
    }
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot(data))
    return bytes(generate_latest(registry))
