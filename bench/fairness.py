"""Fair shares between API keys, measured: `python -m bench.fairness`.

One worker with 4 slots on the fake engine (a fixed rate per stream, so a job's
length is known), one API, two keys. Key A queues `--flood` jobs of `--tokens`
tokens each (about a minute of work at the default rate); key B then sends 8 short
requests one after another, each streamed to its first token. Printed, for
FAIR_QUEUEING=false (arrival order, ModelQ alone) and true, side by side in one
run: B's time to first token (p50, max), and A's throughput while B was served
beside it against A's alone. Then 10 keys with weights 1..10 backlogged together:
each key's share of the tokens generated in a window, beside its weight's share.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
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


def scenario(workdir: Path, fair: bool, args: argparse.Namespace) -> dict[str, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    proc, url = start_redis(workdir)
    env = service_env(
        url,
        f"fake:{args.rate}",
        API_KEYS=",".join(KEYS),
        API_KEY_WEIGHTS=",".join(f"{k}={i + 1}" for i, k in enumerate(KEYS)),
        FAIR_QUEUEING=str(fair).lower(),
        MAX_QUEUED_PER_CALLER="1000",
        JOB_TIMEOUT="900",
    )
    workers = start_workers(env, workdir, 1, concurrency=4)
    api, base = start_api(env, workdir)
    try:
        wait_for_workers(base, 1, proc=workers)
        a, b = KEYS[0], KEYS[1]
        flood = [post(base, a, args.tokens) for _ in range(args.flood)]
        time.sleep(1)  # A's backlog is running
        window_start = time.time()
        ttfts = [first_token_seconds(base, b, 16) for _ in range(8)]
        window_end = time.time()
        a_rate = tokens_between(url, flood, window_start, window_end) / (window_end - window_start)
        for job in flood:  # an empty queue for the weighted round
            httpx.delete(f"{base}/jobs/{job}", headers={"Authorization": f"Bearer {a}"})
        result = {
            "b_ttft_p50": statistics.median(ttfts),
            "b_ttft_max": max(ttfts),
            "a_tokens_per_s_shared": a_rate,
        }
        if fair:
            # The weighted round's backlogs are queued with no worker running, so
            # that every key waits from the window's start.
            workers.stop()
            posted = backlogs(base, args)
            workers = start_workers(env, workdir, 1, concurrency=4)
            wait_for_workers(base, 1, proc=workers)
            result |= weighted(url, posted, args)
        return result
    finally:
        workers.stop()
        api.stop()
        proc.terminate()


def backlogs(base: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """`--per-key` short jobs for each of the 10 keys (weights 1..10)."""
    return {key: [post(base, key, 20) for _ in range(args.per_key)] for key in KEYS}


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
    parser.add_argument("--window", type=float, default=10, help="weighted round, seconds")
    parser.add_argument("--per-key", type=int, default=60, help="weighted round's jobs per key")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-fair-"))
    alone = None
    results = {}
    for fair in (False, True):
        results[fair] = scenario(root / f"fair-{fair}", fair, args)
    # A alone: its rate with 4 slots is 4 × rate (fake streams do not share a CPU).
    alone = 4 * args.rate
    print(f"{'':<34}{'FIFO':>10}{'fair':>10}")
    for name in ("b_ttft_p50", "b_ttft_max", "a_tokens_per_s_shared"):
        print(f"{name:<34}{results[False][name]:>10.2f}{results[True][name]:>10.2f}")
    print(f"{'A alone, tokens/s (4 slots)':<34}{alone:>10.0f}")
    print("weighted round (fair): weight, share of tokens, weight's share")
    for i in range(10):
        share, target = results[True][f"share_w{i + 1}"], results[True][f"target_w{i + 1}"]
        print(f"  w={i + 1:<3} {share:7.3f} {target:7.3f}  ({share / target:5.2f}×)")


if __name__ == "__main__":
    main()
