"""Fair shares between API keys, measured: `python -m bench.fairness`.

One worker with 4 slots on the fake engine (a fixed rate per stream, so a job's
length is known), one API, two keys (`--apis 2 --workers 2 --slots 2`: the same 4
slots across two workers, A's jobs spread over both APIs, B's on the second). Key
A queues `--flood` jobs of `--tokens` tokens each (about a minute of work at the
default rate); key B then sends 8 short
requests one after another, each streamed to its first token. Printed, for
FAIR_QUEUEING=false (arrival order, ModelQ alone) and true, side by side in one
run: B's time to first token (p50, max), and A's throughput while B was served
beside it against A's alone, and Redis's own cost per job started in that phase
(its CPU seconds and commands, from INFO: what the fair claim adds to ModelQ's).
Then 10 keys with weights 1..10 backlogged together: each key's share of the tokens
generated in a window, beside its weight's share.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import redis

from bench.cluster import (
    iter_sse_lines,
    service_env,
    start_api,
    start_redis,
    start_workers,
    wait_for_workers,
)
from textstream import keys
from textstream.transport.events import EventType, parse_entry

#: A and B (weight 1 each) for the flood; the weighted round's 10 keys are others,
#: so that neither the flood's service nor its late settles (the charges given back
#: for A's jobs cancelled before they ran) carry over into the shares measured.
A_KEY, B_KEY = "bench-key-a", "bench-key-b"
KEYS = [f"bench-key-{i}" for i in range(10)]


def post(base: str, key: str, tokens: int) -> str:
    reply = httpx.post(
        base + "/jobs",
        json={"prompt": "Hi", "max_new_tokens": tokens, "ignore_eos": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    reply.raise_for_status()
    return str(reply.json()["id"])


def first_token_seconds(base: str, key: str, tokens: int) -> float:
    started = time.perf_counter()
    job = post(base, key, tokens)
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.stream("GET", f"{base}/jobs/{job}/events", headers=headers, timeout=300) as r:
        for event in iter_sse_lines(r.iter_lines()):
            if event.event == "token":
                return time.perf_counter() - started
    raise RuntimeError("no token")


def tokens_between(url: str, jobs: list[str], start: float, end: float) -> int:
    """Tokens the jobs' streams stored between two unix times (read from Redis:
    reading a thousand statuses through the API would take longer than the window)."""
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for job in jobs:
        pipe.xrange(keys.job_events(job), int(start * 1000), int(end * 1000))
    total = 0
    for entries in pipe.execute():
        for raw_id, fields in entries:
            total += sum(1 for e in parse_entry(raw_id, fields) if e.event == EventType.TOKEN)
    client.close()
    return total


def redis_cost(url: str) -> tuple[float, int]:
    """Redis's CPU seconds (user + system) and commands processed so far."""
    client = redis.Redis.from_url(url)
    cpu, stats = client.info("cpu"), client.info("stats")
    client.close()
    return cpu["used_cpu_user"] + cpu["used_cpu_sys"], int(stats["total_commands_processed"])


def started(url: str, jobs: list[str]) -> int:
    """How many of the jobs a worker started."""
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    for job in jobs:
        pipe.xrange(keys.job_events(job))
    count = 0
    for entries in pipe.execute():
        events = [e for raw_id, fields in entries for e in parse_entry(raw_id, fields)]
        count += any(e.event == EventType.STARTED for e in events)
    client.close()
    return count


def scenario(workdir: Path, fair: bool, args: argparse.Namespace) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc, url = start_redis(workdir)
    env = service_env(
        url,
        f"fake:{args.rate}",
        API_KEYS=",".join([A_KEY, B_KEY, *KEYS]),
        API_KEY_WEIGHTS=",".join(f"{k}={i + 1}" for i, k in enumerate(KEYS)),
        FAIR_QUEUEING=str(fair).lower(),
        MAX_QUEUED_JOBS="5000",
        MAX_QUEUED_PER_CALLER="1000",
        JOB_TIMEOUT="900",
    )
    workers = start_workers(env, workdir, args.workers, concurrency=args.slots)
    apis = [start_api(env, workdir, name=f"api{i}") for i in range(args.apis)]
    bases = [base for _proc, base in apis]
    base = bases[0]
    try:
        wait_for_workers(base, args.workers, proc=workers)
        a, b = A_KEY, B_KEY
        cpu0, commands0 = redis_cost(url)
        flood = [post(bases[i % len(bases)], a, args.tokens) for i in range(args.flood)]
        time.sleep(1)  # A's backlog is running
        window_start = time.time()
        ttfts = [first_token_seconds(bases[-1], b, 16) for _ in range(8)]
        window_end = time.time()
        cpu1, commands1 = redis_cost(url)
        jobs = started(url, flood) + len(ttfts)
        a_rate = tokens_between(url, flood, window_start, window_end) / (window_end - window_start)
        for job in flood:  # an empty queue for the weighted round
            httpx.delete(f"{base}/jobs/{job}", headers={"Authorization": f"Bearer {a}"})
        result = {
            "b_ttft_p50": statistics.median(ttfts),
            "b_ttft_max": max(ttfts),
            "a_tokens_per_s_shared": a_rate,
            "redis_cpu_ms_per_job": (cpu1 - cpu0) * 1000 / jobs,
            "redis_commands_per_job": (commands1 - commands0) / jobs,
        }
        if fair:
            # The weighted round's backlogs are queued with no worker running, so
            # that every key waits from the window's start.
            workers.stop()
            posted = backlogs(bases, args)
            workers = start_workers(env, workdir, args.workers, concurrency=args.slots)
            wait_for_workers(base, args.workers, proc=workers)
            result |= weighted(url, posted, args)
        return result
    finally:
        workers.stop()
        for api, _base in apis:
            api.stop()
        proc.terminate()


def backlogs(bases: list[str], args: argparse.Namespace) -> dict[str, list[str]]:
    """Short jobs for each of the 10 keys (weights 1..10): `--per-key` for weight
    10, fewer in proportion (plus 10) for the others, so that each stays backlogged
    through the window. Posted 8 at a time, across the APIs."""
    counts = {key: args.per_key * (i + 1) // 10 + 10 for i, key in enumerate(KEYS)}
    work = [(key, n) for key, count in counts.items() for n in range(count)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda kn: post(bases[kn[1] % len(bases)], kn[0], 20), work))
    posted: dict[str, list[str]] = {key: [] for key in KEYS}
    for (key, _n), job in zip(work, ids, strict=True):
        posted[key].append(job)
    return posted


def weighted(url: str, jobs: dict[str, list[str]], args: argparse.Namespace) -> dict[str, float]:
    """Each key's share of the tokens generated over `--window` seconds while every
    key has a backlog."""
    start = time.time()
    time.sleep(args.window)
    done = {key: tokens_between(url, jobs[key], start, start + args.window) for key in KEYS}
    total = sum(done.values()) or 1
    out: dict[str, float] = {}
    for i, key in enumerate(KEYS):
        out[f"share_w{i + 1}"] = done[key] / total
        out[f"target_w{i + 1}"] = (i + 1) / 55
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=100, help="fake tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per flood job")
    parser.add_argument("--flood", type=int, default=120)
    parser.add_argument("--window", type=float, default=60, help="weighted round, seconds")
    parser.add_argument(
        "--per-key", type=int, default=300, help="weighted round's jobs for weight 10"
    )
    parser.add_argument("--apis", type=int, default=1, help="API processes")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--slots", type=int, default=4, help="slots per worker")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    alone = None
    results = {}
    for fair in (False, True):
        results[fair] = scenario(root / f"fair-{fair}", fair, args)
    # A alone: its rate is slots × rate (fake streams do not share a CPU).
    slots = args.workers * args.slots
    alone = slots * args.rate
    print(f"{args.apis} API(s), {args.workers} worker(s) × {args.slots} slots")
    print(f"{'':<34}{'FIFO':>10}{'fair':>10}")
    for name in (
        "b_ttft_p50",
        "b_ttft_max",
        "a_tokens_per_s_shared",
        "redis_cpu_ms_per_job",
        "redis_commands_per_job",
    ):
        print(f"{name:<34}{results[False][name]:>10.2f}{results[True][name]:>10.2f}")
    print(f"{f'A alone, tokens/s ({slots} slots)':<34}{alone:>10.0f}")
    print("weighted round (fair): weight, share of tokens, weight's share")
    for i in range(10):
        share, target = results[True][f"share_w{i + 1}"], results[True][f"target_w{i + 1}"]
        print(f"  w={i + 1:<3} {share:7.3f} {target:7.3f}  ({share / target:5.2f}×)")


if __name__ == "__main__":
    main()
