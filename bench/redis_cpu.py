"""Benchmark: Redis CPU per generated token, and tokens/s per Redis core.

    python -m bench.redis_cpu [--streams 64] [--requests 256] [--tokens 64] [--rate 50]
                              [--workers 2] [--slots 40] [--runs 2] [--cluster]

The whole service on one machine (fake engine, no torch): Redis, `--workers`
worker processes, one API process, and a client holding `--streams` streams open.
After a warm-up level, Redis's statistics are reset (`CONFIG RESETSTAT`), the
measured level runs, and the bench reads what Redis spent:

- `INFO commandstats`: microseconds spent executing commands (the script, XREAD,
  CLIENT UNBLOCK, ModelQ's claim...), per command and in all, per generated token;
- `INFO cpu`: the redis-server process's own CPU (user + system: command execution
  plus networking and event loop), per generated token.

Tokens/s per Redis core is 1 / (process CPU per token): how many tokens one Redis
main thread could carry at this load shape. With `--cluster`, the job streams live
on a local Redis Cluster (3 masters + 3 replicas) and the queue on its own Redis;
the figures are then summed over the masters (what the stream role costs), with
the queue Redis and the replicas reported apart.

Each run prints one line; results go to bench/results/redis-cpu[-cluster].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench.cluster import local_stack
from bench.serving import RESULTS, run_level, summarize


def redis_stats(url: str) -> dict[str, Any]:
    """Command microseconds by command, and the process's CPU seconds, of one Redis."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
    finally:
        client.close()
    usec = Counter({name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()})
    calls = Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})
    return {
        "usec": usec,
        "calls": calls,
        "cpu_seconds": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


def reset_stats(urls: list[str]) -> None:
    for url in urls:
        client = redis.Redis.from_url(url)
        client.config_resetstat()
        client.close()


def measure(base: str, urls: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """One measured level: reset, run, read Redis's figures back."""
    all_urls = [u for group in urls.values() for u in group]
    reset_stats(all_urls)
    cpu_before = {u: redis_stats(u)["cpu_seconds"] for u in all_urls}
    started = time.perf_counter()
    results = asyncio.run(run_level(base, args.streams, args.requests, args.tokens))
    seconds = time.perf_counter() - started
    row = summarize(results, seconds)
    tokens = sum(r["tokens"] for r in results if "error" not in r)
    report: dict[str, Any] = {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "errors": row["errors"],
        "tokens_per_s": row["output_tokens_per_s"],
        "itl_ms": row["itl_ms"],
        "ttft_ms": row["ttft_ms"],
    }
    for role, group in urls.items():
        usec: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        cpu = 0.0
        for url in group:
            stats = redis_stats(url)
            usec += stats["usec"]
            calls += stats["calls"]
            cpu += stats["cpu_seconds"] - cpu_before[url]
        report[role] = {
            "command_usec_per_token": round(sum(usec.values()) / tokens, 2),
            "process_cpu_usec_per_token": round(cpu * 1e6 / tokens, 2),
            "tokens_per_s_per_core": round(tokens / cpu) if cpu else None,
            "by_command": {
                name: {
                    "usec_per_token": round(us / tokens, 2),
                    "calls_per_token": round(calls[name] / tokens, 3),
                }
                for name, us in usec.most_common()
                if us / tokens >= 0.05
            },
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256, help="requests in a measured run")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--rate", type=int, default=50, help="fake engine tokens/s per stream")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=40)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cluster", action="store_true", help="job streams on a Redis Cluster")
    parser.add_argument("--env", action="append", default=[], help="NAME=value for the service")
    parser.add_argument(
        "--stream-node-max-entries",
        type=int,
        default=0,
        help="set on the streams' Redis (0: leave Redis's default, 100)",
    )
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="redis-cpu-") as tmp:
        service = local_stack(
            Path(tmp),
            f"fake:{args.rate}",
            args.workers,
            args.slots,
            streams_cluster=args.cluster,
            env={"MAX_QUEUED_JOBS": "100000", "CACHE_TTL": "0", **extra},
        )
        with service as (base, urls):
            if args.stream_node_max_entries:
                for url in urls["streams"]:
                    node = redis.Redis.from_url(url)
                    node.config_set("stream-node-max-entries", args.stream_node_max_entries)
                    node.close()
            asyncio.run(run_level(base, args.streams, args.streams, 16))  # warm-up
            for run in range(args.runs):
                report = measure(base, urls, args)
                runs.append(report)
                streams = report["streams"]
                print(
                    f"run {run + 1}: {report['tokens']} tokens, {report['tokens_per_s']:.0f}"
                    f" tokens/s, errors {report['errors']}; stream Redis: "
                    f"{streams['command_usec_per_token']} us/token in commands, "
                    f"{streams['process_cpu_usec_per_token']} us/token process CPU, "
                    f"{streams['tokens_per_s_per_core']} tokens/s per core"
                    + (
                        f"; queue Redis {report['queue']['process_cpu_usec_per_token']}"
                        " us/token process CPU"
                        if "queue" in report
                        else ""
                    )
                )
                top = list(streams["by_command"].items())[:6]
                print("   ", ", ".join(f"{k} {v['usec_per_token']}" for k, v in top))
    out = RESULTS / f"redis-cpu{'-cluster' if args.cluster else ''}.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}",
                "runs": runs,
            },
            indent=2,
        )
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
