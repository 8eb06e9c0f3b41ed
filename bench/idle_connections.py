"""Benchmark: what open, mostly idle SSE connections cost one API process.

    python -m bench.idle_connections [--connections 10000] [--seconds 30]
        [--token-every 60] [--tree after=. --tree before=/tmp/before] [--ping 15]

One Redis, one API process, no worker processes. Half the connections follow jobs
that wait in the queue (a model with no worker: `queued` events every
QUEUE_STATUS_SECONDS), half follow running jobs that stream very slowly: a
synthetic writer (its own process, as in bench/relay.py) serves a second model,
takes its jobs off the queue, writes `started` and a first token at once, then one
token per job every --token-every seconds (written once a second, the due jobs
together). The clients are bare asyncio protocols in two processes of their own
(one per half), so that their CPU is not the API's; they only count bytes.

Measured, per tree (`--tree name=path` runs the API from another checkout, e.g.
`git worktree add /tmp/before HEAD~1`, so figures before and after a change come
from one run on one machine):
- the API process's CPU (utime + stime from /proc/<pid>/stat) over --seconds,
  with no connection, then with every connection open;
- its RSS before and after the connections, per connection;
- `/health` (full answer) and a new completion's first byte and first token
  (the writer answers it at once), median of a few, on the idle process and
  under the open connections.

`ulimit -n` is raised to its hard limit here, for this process, the clients and
the API and Redis it starts (they inherit it). Results: bench/results/idle_connections-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import time
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as StopEvent
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.cluster import service_env, start_api, start_redis, wait_for_workers
from bench.serving import RESULTS
from textstream import keys
from textstream.registry import WorkerHeartbeat, WorkerInfo
from textstream.sources import served_name
from textstream.transport.scripts import APPEND_SCRIPT, append_args, new_event
from textstream.transport.scripts import EventType as Ev

#: The model the writer serves (running jobs); the API's MODEL_ID's has no worker.
RUNNING = "idle-bench-running"
WAITING = served_name("fake")
HEARTBEAT = 2.0
#: Connections being opened at once by one client process (until their first byte).
OPENING = 50


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard one; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the synthetic writer --------------------------------------------------------------


async def write_slowly(url: str, token_every: float) -> None:
    """Claim the running model's jobs as they come; `started` and a token at once,
    then a token per job every `token_every` seconds."""
    client = aioredis.Redis.from_url(url)
    script = client.register_script(APPEND_SCRIPT)
    queue = keys.queue_key(RUNNING, keys.MODELQ_QUEUE)
    index = keys.queue_key(RUNNING, keys.MODELQ_QUEUED_INDEX)
    due: dict[str, float] = {}
    written: dict[str, int] = {}
    last_tick = time.monotonic()
    while True:
        now = time.monotonic()
        claimed = [json.loads(raw)["task_id"] for raw in await client.lpop(queue, 1000) or []]
        batch: list[tuple[str, list[Any], bool]] = []
        for job_id in claimed:
            due[job_id] = now + token_every * random.random()
            written[job_id] = 1
            events = [new_event(Ev.STARTED, {"worker": "synthetic"})]
            events.append(new_event(Ev.TOKEN, {"text": " first"}))
            batch.append((job_id, events, True))
        if now - last_tick >= 1.0:  # the due tokens, once a second, together
            last_tick = now
            for job_id, when in list(due.items()):
                if when <= now:
                    due[job_id] = when + token_every
                    written[job_id] += 1
                    events = [new_event(Ev.TOKEN, {"text": f" w{written[job_id]}"})]
                    batch.append((job_id, events, False))
        if claimed:
            await client.zrem(index, *claimed)
        pipe = client.pipeline(transaction=False)
        for start in range(0, len(batch), 100):
            call_keys: list[str] = []
            args: list[Any] = []
            for job_id, events, new in batch[start : start + 100]:
                call_keys += [keys.job_events(job_id), keys.job_state(job_id)]
                args += append_args(events, maxlen=10_000, ttl=3600, owner="synthetic", claim=new)
            await script(keys=call_keys, args=args, client=pipe)
        if batch:
            await pipe.execute()
        await asyncio.sleep(0.02)


def writer_process(url: str, token_every: float) -> None:
    info = WorkerInfo(
        "synthetic", platform.node(), os.getpid(), RUNNING, "cpu", 100_000, model_source="fake"
    )
    heartbeat = WorkerHeartbeat(redis.Redis.from_url(url), info, HEARTBEAT)
    heartbeat.beat()
    heartbeat.start()
    asyncio.run(write_slowly(url, token_every))


# -- the clients -------------------------------------------------------------------


class Holder(asyncio.Protocol):
    """One SSE connection that only counts what arrives."""

    def __init__(self, request: bytes, counts: Counts) -> None:
        self.request, self.counts = request, counts
        self.answered = asyncio.get_running_loop().create_future()
        self.failed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.answered.done():
            self.failed = not data.startswith(b"HTTP/1.1 200")
            self.answered.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.counts.closed += 1
        if not self.answered.done():
            self.failed = True
            self.answered.set_result(None)


@dataclass
class Counts:
    opened: int = 0
    answered: int = 0
    failed: int = 0
    closed: int = 0


async def hold(
    port: int, model: str, n: int, tag: str, shared: list[Synchronized[int]], stop: StopEvent
) -> None:
    loop, counts = asyncio.get_running_loop(), Counts()
    opening = asyncio.Semaphore(OPENING)
    held: list[asyncio.BaseTransport] = []

    async def one(i: int) -> None:
        request = (
            f"GET /completion/{tag}%20{i}?model={model}&max_new_tokens=500 HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        async with opening:
            try:
                transport, protocol = await loop.create_connection(
                    lambda: Holder(request, counts), "127.0.0.1", port
                )
            except OSError:
                counts.failed += 1
                return
            counts.opened += 1
            held.append(transport)
            await protocol.answered
            counts.answered += 1
            counts.failed += protocol.failed

    async def report() -> None:
        while not stop.is_set():
            shared[0].value, shared[1].value = counts.opened, counts.answered
            shared[2].value, shared[3].value = counts.failed, counts.closed
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report())
    await asyncio.gather(*(one(i) for i in range(n)))
    await reporter
    for transport in held:
        transport.close()


def client_process(
    port: int, model: str, n: int, tag: str, shared: list[Synchronized[int]], stop: StopEvent
) -> None:
    raise_nofile()
    asyncio.run(hold(port, model, n, tag, shared, stop))


# -- probes ------------------------------------------------------------------------


async def timed_get(port: int, path: str, until: bytes | None) -> tuple[float, float]:
    """(first byte, `until` seen or the answer ended) in ms, of one GET."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    )
    received = await reader.read(65536)
    first = time.perf_counter()
    while received and (until is None or until not in received):
        more = await reader.read(65536)
        if not more:
            break
        received += more
    done = time.perf_counter()
    writer.close()
    return (first - started) * 1000, (done - started) * 1000


#: A probe that takes longer counts as this long (a saturated process answers late).
PROBE_TIMEOUT = 30.0


async def timed_or_late(port: int, path: str, until: bytes | None) -> tuple[float, float]:
    try:
        return await asyncio.wait_for(timed_get(port, path, until), PROBE_TIMEOUT)
    except (TimeoutError, OSError):
        return PROBE_TIMEOUT * 1000, PROBE_TIMEOUT * 1000


def probe(port: int, rounds: int = 5) -> dict[str, float]:
    """Medians: /health answered; a new completion's first byte and first token."""

    async def run() -> dict[str, float]:
        health, first_byte, first_token = [], [], []
        for _ in range(rounds):
            health.append((await timed_or_late(port, "/health", None))[1])
            path = f"/completion/probe%20{random.random()}?model={RUNNING}&max_new_tokens=2"
            byte, token = await timed_or_late(port, path, b"event: token")
            first_byte.append(byte)
            first_token.append(token)
            await asyncio.sleep(0.2)
        return {
            "health_ms": round(statistics.median(health), 1),
            "completion_first_byte_ms": round(statistics.median(first_byte), 1),
            "completion_first_token_ms": round(statistics.median(first_token), 1),
        }

    return asyncio.run(run())


# -- one tree ----------------------------------------------------------------------


def cpu_share(pid: int, seconds: float) -> float:
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - started)


def measure(name: str, tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    workdir = RESULTS / "idle_connections" / name
    workdir.mkdir(parents=True, exist_ok=True)
    redis_proc, url = start_redis(workdir)
    env = service_env(
        url,
        "fake",
        PYTHONPATH=str(tree.resolve()),
        LOG_LEVEL="WARNING",
        MAX_QUEUED_JOBS="100000",
        JOB_TIMEOUT="3600",
        WORKER_HEARTBEAT_SECONDS=str(HEARTBEAT),
        SSE_PING_SECONDS=str(args.ping),
        QUEUE_STATUS_SECONDS=str(args.queue_status),
    )
    api, base = start_api(env, workdir, name=f"idle-api-{name}")
    assert api.popen is not None
    pid, port = api.popen.pid, int(base.rsplit(":", 1)[1])
    writer = multiprocessing.Process(target=writer_process, args=(url, args.token_every))
    stop = multiprocessing.Event()
    clients: list[multiprocessing.Process] = []
    halves = [(RUNNING, args.connections // 2, "run"), (WAITING, args.connections // 2, "wait")]
    shared = [[multiprocessing.Value("q", 0) for _ in range(4)] for _ in halves]
    try:
        writer.start()
        wait_for_workers(base, 1, 30)
        row: dict[str, Any] = {"tree": str(tree), "connections": args.connections}
        time.sleep(3)  # start-up work settles
        idle_cpu = cpu_share(pid, 10)
        row["idle"] = {**probe(port), "api_cpu_share": round(idle_cpu, 4)}
        time.sleep(3)  # the probes' jobs end
        rss_before = rss_kib(pid)
        opening = time.monotonic()
        for (model, n, tag), counters in zip(halves, shared, strict=True):
            client = multiprocessing.Process(
                target=client_process, args=(port, model, n, tag, counters, stop)
            )
            client.start()
            clients.append(client)
        while sum(c[1].value for c in shared) < args.connections:
            if time.monotonic() - opening > args.open_timeout:
                break
            time.sleep(1)
        row["open_seconds"] = round(time.monotonic() - opening, 1)
        row["answered"] = sum(c[1].value for c in shared)
        row["failed"] = sum(c[2].value for c in shared)
        time.sleep(5)  # the last submissions' work settles
        print(
            f"{name}: {row['answered']} connections open; measuring {args.seconds:g} s", flush=True
        )
        row["loaded_api_cpu_share"] = round(cpu_share(pid, args.seconds), 4)
        print(f"{name}: API CPU {row['loaded_api_cpu_share'] * 100:.1f} % of a core", flush=True)
        rss_after = rss_kib(pid)
        row["rss_before_mib"] = round(rss_before / 1024, 1)
        row["rss_after_mib"] = round(rss_after / 1024, 1)
        row["rss_per_connection_kib"] = round((rss_after - rss_before) / args.connections, 1)
        row["loaded"] = probe(port)
        row["closed_early"] = sum(c[3].value for c in shared)
        return row
    finally:
        stop.set()
        for client in clients:
            client.join(30)
            client.kill()
        writer.kill()
        api.stop()
        redis_proc.terminate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measuring window")
    parser.add_argument("--token-every", type=float, default=60.0, help="per running job")
    parser.add_argument("--ping", type=int, default=15, help="SSE_PING_SECONDS")
    parser.add_argument("--queue-status", type=float, default=2.0, help="QUEUE_STATUS_SECONDS")
    parser.add_argument("--open-timeout", type=float, default=300.0)
    parser.add_argument(
        "--tree", action="append", default=[], help="name=path of a checkout to run the API from"
    )
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    trees = [tuple(t.split("=", 1)) for t in args.tree] or [("this", ".")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = {name: measure(name, Path(path), args) for name, path in trees}
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, avx512f: "
        f"{'avx512f' in Path('/proc/cpuinfo').read_text()}",
        "ulimit_n": nofile,
        "token_every_s": args.token_every,
        "sse_ping_seconds": args.ping,
        "queue_status_seconds": args.queue_status,
        "rows": rows,
    }
    out = RESULTS / f"idle_connections-{args.connections}-q{args.queue_status:g}-p{args.ping}.json"
    out.write_text(json.dumps(report, indent=2))
    print(
        f"{report['machine']}; ulimit -n {nofile}; {args.connections} connections; "
        f"QUEUE_STATUS_SECONDS {args.queue_status:g}, SSE_PING_SECONDS {args.ping}, "
        f"a token per running job every {args.token_every:g} s"
    )
    names = list(rows)
    lines = [
        ("answered / failed", lambda r: f"{r['answered']} / {r['failed']}"),
        ("opened in (s)", lambda r: r["open_seconds"]),
        ("API CPU idle (% core)", lambda r: round(r["idle"]["api_cpu_share"] * 100, 1)),
        ("API CPU loaded (% core)", lambda r: round(r["loaded_api_cpu_share"] * 100, 1)),
        ("RSS before / after (MiB)", lambda r: f"{r['rss_before_mib']} / {r['rss_after_mib']}"),
        ("RSS per connection (KiB)", lambda r: r["rss_per_connection_kib"]),
        ("/health idle / loaded (ms)", lambda r: _pair(r, "health_ms")),
        ("first byte idle / loaded (ms)", lambda r: _pair(r, "completion_first_byte_ms")),
        ("first token idle / loaded (ms)", lambda r: _pair(r, "completion_first_token_ms")),
        ("closed early", lambda r: r["closed_early"]),
    ]
    print(f"{'':32}" + "".join(f"{n:>24}" for n in names))
    for label, value in lines:
        print(f"{label:32}" + "".join(f"{value(rows[n])!s:>24}" for n in names))
    print(f"results: {out}")
    return 0


def _pair(row: dict[str, Any], key: str) -> str:
    return f"{row['idle'][key]} / {row['loaded'][key]}"


if __name__ == "__main__":
    raise SystemExit(main())
