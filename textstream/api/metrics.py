"""/metrics for Prometheus, and the API process's HTTP request counts: the
figures live in Redis (worker/metrics.py writes the jobs'), so every API process
renders the same (textstream/metrics.py names them)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
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
from textstream.metrics import COUNTERS, HISTOGRAMS, PREFIX
from textstream.registry import WorkerInfo


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
