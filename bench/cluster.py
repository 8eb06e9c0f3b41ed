"""Local processes for tests and benchmarks: a worker runner and an API process as
real subprocesses (output to a log file each), and an SSE line parser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(redis_url: str, model_id: str, **overrides: str) -> dict[str, str]:
    """Environment for worker/API subprocesses. Processes run in a temporary cwd, so
    a developer's `.env` in the repo never leaks into a test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_", "REDIS_"))}
    env.update(
        PYTHONPATH=str(REPO),
        REDIS_URL=redis_url,
        MODEL_ID=model_id,
        MODEL_FALLBACK="",
        DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WORKER_HEARTBEAT_SECONDS="0.5",
        WORKER_SHUTDOWN_GRACE="5",
        LOG_LEVEL="INFO",
        # Off unless a test turns it on: repeated identical requests must generate.
        CACHE_TTL="0",
    )
    env.update(overrides)
    return env


@dataclass
class Proc:
    """A subprocess whose combined output goes to a log file we can read back."""

    args: list[str]
    env: dict[str, str]
    cwd: Path
    name: str
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.cwd / f"{self.name}.log"

    def start(self) -> Proc:
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args, env=self.env, cwd=self.cwd, stdout=self.log_file, stderr=subprocess.STDOUT
        )
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log_file.close()
        return self.popen.returncode


def start_workers(
    env: dict[str, str], cwd: Path, workers: int = 1, name: str = "worker", concurrency: int = 1
) -> Proc:
    args = [sys.executable, str(REPO / "runner.py"), "--workers", str(workers)]
    args += ["--concurrency", str(concurrency)]
    return Proc(args, env, cwd, name).start()


def start_api(
    env: dict[str, str], cwd: Path, name: str = "api", log_level: str | None = None
) -> tuple[Proc, str]:
    """One API process, started as `textstream api` (textstream/cli.py)."""
    port = free_port()
    args = [sys.executable, "-m", "textstream", "api", "--host", "127.0.0.1"]
    args += ["--port", str(port)]
    if log_level:
        env = {**env, "LOG_LEVEL": log_level.upper()}
    proc = Proc(args, env, cwd, name).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get_ok(base + "/health"), 30, f"API on {base}", proc)
    except BaseException:
        proc.stop()  # nobody else holds it: it would outlive the run
        raise
    return proc, base


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check: Any, seconds: float, what: str, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise AssertionError(f"{what}: process exited\n{proc.output()[-3000:]}")
        time.sleep(0.1)
    tail = proc.output()[-3000:] if proc else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def wait_for_workers(base: str, count: int, seconds: float = 90, proc: Proc | None = None) -> None:
    def ready() -> bool:
        try:
            return int(httpx.get(base + "/health", timeout=2).json()["workers"]) >= count
        except (httpx.HTTPError, KeyError, ValueError):
            return False

    wait_for(ready, seconds, f"{count} worker(s) on {base}", proc)


@dataclass
class SSEEvent:
    event: str
    data: dict[str, Any]
    id: str | None
    received_at: float  # time.time() when the event's last line arrived


def parse_sse_lines(lines: Any) -> list[SSEEvent]:
    return list(iter_sse_lines(lines))


def iter_sse_lines(lines: Any) -> Iterator[SSEEvent]:
    """Each event as soon as its blank line arrives (a reader may stop mid-stream)."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if "data" in fields:
                yield SSEEvent(
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                    fields.get("id"),
                    time.time(),
                )
            fields = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            fields[key] = value[1:] if value.startswith(" ") else value


def start_redis(
    workdir: Path, port: int | None = None, *extra: str, password: str = ""
) -> tuple[subprocess.Popen[bytes], str]:
    """A throwaway redis-server on a free port (no persistence unless `extra` asks)."""
    from textstream.devredis import find_redis_server, server_command, wait_until_up

    port = port or free_port()
    args = server_command(find_redis_server(), port, "--bind", "127.0.0.1", "--dir", str(workdir))
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL)
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"
    if not wait_until_up(url):
        proc.kill()
        raise RuntimeError("redis-server did not start")
    return proc, url


def chromium_options() -> dict[str, Any]:
    """Launch options for Debian's Chromium under Playwright (never `playwright
    install`): no sandbox as root, and no background traffic to a closed network."""
    return {
        "executable_path": shutil.which("chromium") or "/usr/bin/chromium",
        "args": [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    }


@contextmanager
def local_service(
    workdir: Path, model: str, workers: int = 1, concurrency: int = 1, **env: str
) -> Iterator[str]:
    """Redis, `workers` worker processes and one API, all local; yields the API's
    base URL once the workers are up, and stops everything on the way out."""
    with local_stack(workdir, model, workers, concurrency, env=env) as (base, _urls):
        yield base


@contextmanager
def local_stack(
    workdir: Path,
    model: str,
    workers: int = 1,
    concurrency: int = 1,
    *,
    streams_cluster: bool = False,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, list[str]]]]:
    """As `local_service`, and also yields the Redis URLs by role: "streams" (the
    job streams: one Redis, or a cluster's masters) and, when the streams are on a
    cluster, "queue" (the queue's own Redis) and "replicas"."""
    from bench.redis_cluster import LocalRedisCluster

    workdir.mkdir(parents=True, exist_ok=True)
    redis_proc, url = start_redis(workdir)
    urls = {"streams": [url]}
    extra = dict(env or {})
    cluster = None
    if streams_cluster:
        cluster = LocalRedisCluster(workdir / "cluster").start()
        extra.update(STREAMS_REDIS_URL=cluster.url, STREAMS_REDIS_CLUSTER="true")
        masters = cluster.masters_ports()
        urls = {
            "streams": [f"redis://127.0.0.1:{port}/0" for port in masters],
            "queue": [url],
            "replicas": [
                f"redis://127.0.0.1:{n.port}/0" for n in cluster.nodes if n.port not in masters
            ],
        }
    settings = service_env(url, model, **{"LOG_LEVEL": "WARNING", **extra})
    runner = start_workers(settings, workdir, workers, name="bench-worker", concurrency=concurrency)
    api, base = start_api(settings, workdir, name="bench-api", log_level="warning")
    try:
        wait_for_workers(base, workers, seconds=300, proc=runner)
        yield base, urls
    finally:
        runner.stop()
        api.stop()
        redis_proc.terminate()
        if cluster is not None:
            cluster.stop()
