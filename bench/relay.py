"""Benchmark: how many streams, and tokens/s, one API process relays.

    python -m bench.relay [--streams 1000] [--rate 20] [--tokens 200] [--client raw|httpx]

One API process, one Redis, and no worker processes. The clients open --streams
concurrent `GET /completion/...` streams; a synthetic writer (its own process)
takes the jobs off ModelQ's queue and appends their events through the same Lua
script the workers use (events.py), every stream at --rate tokens/s: a tick's
events of a hundred jobs in one script call, as a worker's flusher gathers its
jobs', all the calls in one round trip per tick. The writer costs little CPU, so on
a small machine this measures the relay (Redis -> API -> SSE -> client) rather
than a thousand worker threads competing for the same cores (bench/serving.py
with `--model fake:20 --streams 1000` runs the whole service instead).

The client holding the streams runs on the same cores as the API. It is a bare
asyncio HTTP/1.1 client by default (`--client raw`): httpx costs about ten times
its CPU per stream, and with it the client, not the service, set the pace of a
1,000-stream burst (`--client httpx` measures that way still).

Reports relayed tokens/s over the whole run and while every stream was open at
once (without the connection ramp-up and the tail), errors, inter-token latency
at the client, and the API process's CPU use per 1,000 relayed tokens.
Results go to bench/results/relay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import time
from typing import Any

import psutil
import redis
import redis.asyncio as aioredis

from bench.cluster import service_env, start_api, start_redis, wait_for_workers
from bench.serving import RESULTS, run_level, summarize
from textstream import keys
from textstream.registry import WorkerHeartbeat, WorkerInfo
from textstream.sources import served_name
from textstream.transport.scripts import APPEND_SCRIPT, EventType, append_args, new_event

#: ModelQ's list of the served model's queue (the API's MODEL_ID is "fake").
QUEUE = keys.queue_key(served_name("fake"), keys.MODELQ_QUEUE)


#: Jobs per script call: a worker's StreamFlusher also sends all its jobs' events
#: of one window in one call; here a tick's events, a hundred jobs at a time.
JOBS_PER_CALL = 100


async def write_events(url: str, streams: int, tokens: int, rate: float) -> None:
    """Play every worker at once: claim queued jobs, then each tick append one token
    to every running job (and `done` after the last), as the workers' flusher does:
    the tick's events of many jobs in one call of their append script, all the
    calls pipelined in one round trip."""
    client = aioredis.Redis.from_url(url)
    script = client.register_script(APPEND_SCRIPT)
    running: dict[str, int] = {}  # job id -> tokens written
    ended, tick = 0, time.monotonic()
    while ended < streams:
        claimed = [json.loads(raw)["task_id"] for raw in await client.lpop(QUEUE, 1000) or []]
        parts: list[tuple[str, list[Any], bool]] = []
        for job_id in claimed:
            running[job_id] = 0
        for job_id, written in list(running.items()):
            new = job_id in claimed
            events = [new_event(EventType.STARTED, {"worker": "synthetic"})] if new else []
            if written < tokens:
                events.append(new_event(EventType.TOKEN, {"text": f" w{written}"}))
                running[job_id] = written + 1
            else:
                usage = {"prompt_tokens": 1, "completion_tokens": tokens}
                data = {"finish_reason": "length", "model": "synthetic", "usage": usage}
                events.append(new_event(EventType.DONE, data))
                del running[job_id]
                ended += 1
            parts.append((job_id, events, new))
        pipe = client.pipeline(transaction=False)
        for start in range(0, len(parts), JOBS_PER_CALL):
            call_keys: list[str] = []
            args: list[Any] = []
            for job_id, events, new in parts[start : start + JOBS_PER_CALL]:
                call_keys += [keys.job_events(job_id), keys.job_state(job_id)]
                args += append_args(events, maxlen=10_000, ttl=600, owner="synthetic", claim=new)
            await script(keys=call_keys, args=args, client=pipe)
        await pipe.execute()
        tick += 1 / rate
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
    await client.close()


def writer_process(url: str, streams: int, tokens: int, rate: float, interval: float) -> None:
    # Announced in the worker registry, as a worker would be: the API resolves a
    # request's model from the live workers (with none, it reads the registry on
    # every submission, which no deployment serving requests does).
    model = served_name("fake")
    info = WorkerInfo(
        "synthetic", platform.node(), os.getpid(), model, "cpu", streams, model_source="fake"
    )
    heartbeat = WorkerHeartbeat(redis.Redis.from_url(url), info, interval)
    heartbeat.beat()
    heartbeat.start()
    asyncio.run(write_events(url, streams, tokens, rate))


def busy(proc: psutil.Process) -> float:
    """CPU seconds `proc` has used (user + system)."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="tokens/s per stream")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument(
        "--client",
        default="raw",
        choices=["raw", "httpx"],
        help="the streams' client: bare asyncio connections, or httpx (its CPU per "
        "stream made the client, on the same cores, set the burst's pace)",
    )
    args = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = RESULTS / "relay"
    workdir.mkdir(exist_ok=True)

    redis_proc, url = start_redis(workdir)
    env = service_env(url, "fake", LOG_LEVEL="WARNING", MAX_QUEUED_JOBS="100000", CACHE_TTL="0")
    api, base = start_api(env, workdir, name="relay-api", log_level="warning")
    assert api.popen is not None
    api_cpu = psutil.Process(api.popen.pid)
    interval = float(env["WORKER_HEARTBEAT_SECONDS"])
    writer = multiprocessing.Process(
        target=writer_process, args=(url, args.streams, args.tokens, args.rate, interval)
    )
    try:
        writer.start()
        wait_for_workers(base, 1, 30)  # the synthetic writer announced itself
        # Every process on the machine's cores: which one runs out first.
        procs = {
            "api": api_cpu,
            "writer": psutil.Process(writer.pid),
            "redis": psutil.Process(redis_proc.pid),
            "client": psutil.Process(),
        }
        cpu_before, started = api_cpu.cpu_times(), time.perf_counter()
        before = {name: busy(proc) for name, proc in procs.items()}
        results = asyncio.run(run_level(base, args.streams, args.streams, args.tokens, args.client))
        seconds = time.perf_counter() - started
        cpu_after = api_cpu.cpu_times()
        shares = {
            name: round((busy(proc) - before[name]) / seconds, 3) for name, proc in procs.items()
        }
        writer.join(30)
    finally:
        writer.kill()
        api.stop()
        redis_proc.terminate()
    row = summarize(results, seconds)
    api_seconds = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    relayed = sum(r["tokens"] for r in results if "error" not in r)
    report = {
        "streams": args.streams,
        "rate_per_stream": args.rate,
        "tokens_per_stream": args.tokens,
        "client": args.client,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        **row,
        "api_cpu_seconds": round(api_seconds, 2),
        "api_cpu_share": round(api_seconds / seconds, 3),
        "api_cpu_ms_per_1000_tokens": round(api_seconds / relayed * 1e6, 1) if relayed else None,
        "cpu_share_by_process": shares,
    }
    out = RESULTS / "relay.json"
    out.write_text(json.dumps(report, indent=2))
    print(
        f"{args.streams} streams at {args.rate:g} tokens/s each: relayed "
        f"{row['output_tokens_per_s']:.0f} tokens/s over the run, "
        f"{row.get('all_open_tokens_per_s', 0):.0f} tokens/s while all were open, "
        f"errors {row['errors']}, "
        f"ITL p50/p99 {row['itl_ms']['p50']:.1f}/{row['itl_ms']['p99']:.1f} ms, "
        f"TTFT p50/p99 {row['ttft_ms']['p50']:.0f}/{row['ttft_ms']['p99']:.0f} ms"
    )
    print(
        f"API process: {report['api_cpu_share'] * 100:.0f} % of one core, "
        f"{report['api_cpu_ms_per_1000_tokens']} ms CPU per 1000 tokens relayed"
    )
    print(
        f"CPU (share of one core) of {os.cpu_count()}: "
        + ", ".join(f"{name} {share * 100:.0f} %" for name, share in shares.items())
    )
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
