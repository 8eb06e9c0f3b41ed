"""Benchmark: how long a stream waits when its worker is SIGKILLed, and how late a
busy worker's heartbeat runs (what decides how soon a silent one may be replaced).

    python -m bench.takeover [--model SPEC] [--runs 10] [--tokens 160]
        [--takeover-after SECONDS] [--lateness-seconds 60] [--no-lateness]

Takeover: Redis, two workers (runner.py restarts a killed one) and the API, as
`make run` starts them. A greedy reference stream is read first. Then, --runs
times: a job is created and its events read as they come; after 20 tokens the
worker running it (the `started` event names it) is SIGKILLed. The figure is the
time from the kill to the first token the client gets from the worker that took
over (after the `resumed` event: the other worker found the task given back,
claimed it, prefilled the prompt and the published tokens, and streamed on).
The text must equal the reference's: no token lost or doubled.

Lateness: the same stack under load, for --lateness-seconds: 8 long prompts at
once through each worker (prefill in chunks, decode between them), the jobs
streaming, and for the second half two busy processes on both cores (a loaded
host). Every 20 ms the in-flight heartbeat hash is read; for each
task, the time between its heartbeat's successive values, less the interval it
is written at, is its lateness; and the oldest a read found (what a sweeper
would have aged it at, on Redis's clock, as the workers stamp it). The sweeper
may only give back a task whose heartbeat is older than TAKEOVER_AFTER_SECONDS,
so that must exceed the interval plus the worst lateness seen, with a margin.
A stop-the-world garbage collection holds every thread of a worker, the
heartbeat's too: --gc times a full `gc.collect()` in this process with the
model loaded as a worker loads it, before and after the `gc.freeze()` a worker
calls once loaded.

Results go to bench/results/takeover[-<window>s].json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.cluster import REPO, iter_sse_lines, local_stack
from bench.engine_vs_llamacpp import SMOLLM2
from textstream.keys import MODELQ_TASK_HEARTBEATS, queue_key
from textstream.sources import served_name

RESULTS = REPO / "bench" / "results"
PROMPT = "Once upon a time"


def worker_pid(client: redis.Redis, worker: str) -> int:
    return int(json.loads(client.get(f"textstream:worker:{worker}"))["pid"])


def live_workers(client: redis.Redis, exclude: set[str]) -> int:
    names = {k.decode().rsplit(":", 1)[1] for k in client.scan_iter("textstream:worker:*")}
    return len(names - exclude)


def one_takeover(base: str, client: redis.Redis, tokens: int, dead: set[str]) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "ignore_eos": True}
    job = httpx.post(f"{base}/jobs", json=body, timeout=10).json()["id"]
    text, seen, killed_at, first_after, victim, resumed_by = [], 0, 0.0, 0.0, "", ""
    with httpx.stream("GET", f"{base}/jobs/{job}/events", timeout=120) as response:
        for event in iter_sse_lines(response.iter_lines()):
            if event.event == "started" and not victim:
                victim = event.data["worker"]
            elif event.event == "resumed":
                resumed_by = event.data["worker"]
            elif event.event == "token":
                text.append(event.data["text"])
                seen += 1
                if resumed_by and not first_after:  # the new worker's first token
                    first_after = event.received_at
                if seen == 20 and not killed_at:
                    pid = worker_pid(client, victim)
                    killed_at = time.time()
                    os.kill(pid, signal.SIGKILL)
                    dead.add(victim)
            elif event.event in ("done", "error"):
                break
    return {
        "seconds": round(first_after - killed_at, 3),
        "text": "".join(text),
        "resumed_by_other": bool(resumed_by) and resumed_by != victim,
    }


def takeovers(base: str, url: str, runs: int, tokens: int) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    reference = ""
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "ignore_eos": True}
    job = httpx.post(f"{base}/jobs", json=body, timeout=10).json()["id"]
    with httpx.stream("GET", f"{base}/jobs/{job}/events", timeout=120) as response:
        reference = "".join(
            e.data["text"] for e in iter_sse_lines(response.iter_lines()) if e.event == "token"
        )
    dead: set[str] = set()
    results = []
    for run in range(runs):
        deadline = time.monotonic() + 120
        while live_workers(client, dead) < 2:  # the runner's replacement is up
            if time.monotonic() > deadline:
                raise RuntimeError("the killed worker was not replaced")
            time.sleep(0.5)
        time.sleep(1)
        result = one_takeover(base, client, tokens, dead)
        result["identical"] = result.pop("text") == reference
        print(f"run {run + 1}: {json.dumps(result)}", flush=True)
        results.append(result)
    seconds = [r["seconds"] for r in results]
    return {
        "runs": results,
        "median_s": round(statistics.median(seconds), 3),
        "max_s": max(seconds),
        "identical": sum(r["identical"] for r in results),
    }


def _busy(until: float) -> None:
    while time.time() < until:
        pass


def lateness(base: str, url: str, model: str, seconds: float, interval: float) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    key = queue_key(model, MODELQ_TASK_HEARTBEATS)
    stop = threading.Event()
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 120)

    def load() -> None:
        body = {"prompt": long_prompt, "max_new_tokens": 64, "ignore_eos": True}
        while not stop.is_set():
            jobs = [
                httpx.post(f"{base}/jobs", json=body, timeout=10).json()["id"] for _ in range(8)
            ]
            for job in jobs:
                while not stop.is_set():
                    status = httpx.get(f"{base}/jobs/{job}", timeout=10).json()["status"]
                    if status not in ("queued", "running"):
                        break
                    time.sleep(0.2)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    last: dict[str, float] = {}
    gaps: list[float] = []
    oldest = 0.0  # the oldest heartbeat a sweeper's read found (Redis's clock)
    started = time.time()
    hogs: list[multiprocessing.Process] = []
    while time.time() - started < seconds:
        if not hogs and time.time() - started > seconds / 2:
            until = started + seconds
            hogs = [multiprocessing.Process(target=_busy, args=(until,)) for _ in range(2)]
            for hog in hogs:
                hog.start()
        redis_s, redis_us = client.time()
        for task, value in client.hgetall(key).items():
            beat = float(value)
            oldest = max(oldest, redis_s + redis_us / 1e6 - beat)
            previous = last.get(task.decode())
            if previous is not None and beat > previous:
                gaps.append(beat - previous)
            last[task.decode()] = beat
        time.sleep(0.02)
    stop.set()
    for hog in hogs:
        hog.join()
    late = sorted(max(0.0, gap - interval) for gap in gaps)
    return {
        "heartbeats": len(gaps),
        "interval_s": interval,
        "lateness_p50_s": round(late[len(late) // 2], 3) if late else None,
        "lateness_p99_s": round(late[int(len(late) * 0.99)], 3) if late else None,
        "lateness_max_s": round(late[-1], 3) if late else None,
        "oldest_read_s": round(oldest, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--takeover-after", default="")
    parser.add_argument("--heartbeat", type=float, default=0.0, help="interval the bench assumes")
    parser.add_argument("--lateness-seconds", type=float, default=60)
    parser.add_argument("--no-lateness", action="store_true")
    parser.add_argument("--no-takeover", action="store_true")
    parser.add_argument("--gc", action="store_true")
    args = parser.parse_args()
    env = {"TORCH_THREADS": "1"}
    if args.takeover_after:
        env["TAKEOVER_AFTER_SECONDS"] = args.takeover_after
    avx512f = "avx512f" in Path("/proc/cpuinfo").read_text()
    result: dict[str, Any] = {"model": args.model, "env": env, "avx512f": avx512f}
    with (
        tempfile.TemporaryDirectory() as tmp,
        local_stack(Path(tmp), args.model, workers=2, concurrency=4, env=env) as (base, urls),
    ):
        url = urls["streams"][0]
        if not args.no_takeover:
            result["takeover"] = takeovers(base, url, args.runs, args.tokens)
            print(json.dumps({k: v for k, v in result["takeover"].items() if k != "runs"}))
        if not args.no_lateness:
            interval = args.heartbeat or _interval()
            name = served_name(args.model)
            result["lateness"] = lateness(base, url, name, args.lateness_seconds, interval)
            print(json.dumps(result["lateness"]))
    if args.gc:
        pauses = gc_pause(args.model)
        result.update(pauses)
        print(json.dumps(pauses))
    RESULTS.mkdir(exist_ok=True)
    window = f"-{args.takeover_after}s" if args.takeover_after else ""
    (RESULTS / f"takeover{window}.json").write_text(json.dumps(result, indent=2))


def gc_pause(model: str) -> dict[str, float]:
    """The longest of five full collections with the model loaded (seconds), before
    and after `gc.freeze()`, which a worker calls once its model is loaded."""
    import gc

    from textstream.config import Settings
    from textstream.engines.transformers.loading import load_transformers

    engine = load_transformers(Settings(model_id=model, model_fallback="", _env_file=None))  # type: ignore[call-arg]
    result = {}
    for name in ("gc_pause_unfrozen_s", "gc_pause_s"):
        pauses = []
        for _ in range(5):
            started = time.perf_counter()
            gc.collect()
            pauses.append(time.perf_counter() - started)
        result[name] = round(max(pauses), 4)
        gc.freeze()  # as worker/main.py does after loading
    del engine
    return result


def _interval() -> float:
    from textstream.worker.queue import HEARTBEAT_SECONDS

    return HEARTBEAT_SECONDS


if __name__ == "__main__":
    main()
