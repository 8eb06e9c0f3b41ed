"""`textstream`: one command, as `vllm serve` or `ollama serve`.

    textstream serve [--model M] [--host H] [--port P] [--workers N] [--concurrency K]
        Redis (a local one is started when REDIS_URL does not answer), N worker
        processes and the API, in one command; Ctrl-C stops all three.
    textstream api [--host H] [--port P]          the API process alone
    textstream worker [--model M] [--workers N] [--concurrency K] [--gpus 0,1]
    textstream --version

Settings come from the environment and `.env` (see .env.example); `--model` sets
MODEL_ID for this command and the processes it starts.

How `serve` stops, on Ctrl-C or SIGTERM: the API stops accepting, ends open
streams with an `error` event of type `shutdown` (a client may resume them with
Last-Event-ID wherever the job goes on) and exits; the workers stop claiming, give
running jobs WORKER_SHUTDOWN_GRACE seconds, and exit; then the Redis this command
started, and only that one, is stopped. Everything is gone within
WORKER_SHUTDOWN_GRACE + 5 seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from textstream import __version__

log = logging.getLogger("textstream.cli")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="textstream", description="Stream LLM completions over Server-Sent Events."
    )
    parser.add_argument("--version", action="version", version=f"textstream {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="Redis if needed, workers and the API, together")
    api = commands.add_parser("api", help="the API process")
    worker = commands.add_parser("worker", help="worker processes")
    for command in (serve, api):
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)
    for command in (serve, worker):
        command.add_argument("--model", help="MODEL_ID: hub id, directory, .gguf, fake:<rate>")
        command.add_argument("--workers", type=int, default=1, help="worker processes")
        command.add_argument(
            "--concurrency", type=int, default=4, help="batch slots per worker process"
        )
    worker.add_argument("--gpus", default="", help="comma-separated GPU ids: one worker each")
    args = parser.parse_args(argv)
    if getattr(args, "workers", 1) < 1 or getattr(args, "concurrency", 1) < 1:
        parser.error("--workers and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "model", None):
        # The command line is an edge, like .env: it hands MODEL_ID to Settings
        # here and to the worker processes through their environment.
        os.environ["MODEL_ID"] = args.model
    if args.command == "api":
        return run_api(args.host, args.port)
    if args.command == "worker":
        return run_workers(args.workers, args.concurrency, args.gpus)
    return serve(args)


def run_api(host: str, port: int) -> int:
    from textstream.api.server import serve_api
    from textstream.config import get_settings

    serve_api(get_settings(), host, port)
    return 0


def run_workers(workers: int, concurrency: int, gpus: str = "") -> int:
    from textstream.worker.main import run_workers as run

    return run(workers, concurrency, [g.strip() for g in gpus.split(",") if g.strip()])


def serve(args: argparse.Namespace) -> int:
    from textstream.config import get_settings
    from textstream.devredis import LocalRedis, LocalRedisError
    from textstream.logs import configure_logging
    from textstream.transport.sse import STOPPING

    settings = get_settings()
    configure_logging(settings)
    try:
        redis = LocalRedis.ensure(settings.redis_url, Path(".redis"))
    except (LocalRedisError, FileNotFoundError) as exc:
        log.error("no Redis: %s", exc)
        return 1
    if redis.started:
        log.info("started a local Redis at %s (stopped again on exit)", settings.redis_url)
    command = [sys.executable, "-m", "textstream", "worker"]
    command += ["--workers", str(args.workers), "--concurrency", str(args.concurrency)]
    workers = subprocess.Popen(command)
    # The workers start draining the moment the API starts stopping, not after it
    # has stopped: a SIGTERM sent to this process alone (docker stop, systemd)
    # reaches them at once, and the two stops overlap.
    stopper = threading.Thread(
        target=stop_workers_on_shutdown,
        args=(STOPPING, workers, settings.worker_shutdown_grace + 5),
        name="stop-workers",
        daemon=True,
    )
    stopper.start()
    # Once stopped, uvicorn raises again the signal it stopped for. SIGTERM's default
    # action would end this process right there, before the `finally` below stops
    # the workers and the Redis (orphaning both): leave through it instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        run_api(args.host, args.port)
    except KeyboardInterrupt:
        pass  # Ctrl-C: the same clean stop
    finally:
        log.info("API stopped; stopping the workers")
        STOPPING.set()  # also when the API could not start at all
        stopper.join()
        log.info("workers stopped")
        if redis.started:
            redis.stop()
            log.info("the local Redis stopped")
    return 0


def stop_workers_on_shutdown(
    stopping: threading.Event, workers: subprocess.Popen[bytes], seconds: float
) -> None:
    stopping.wait()
    stop_workers(workers, seconds)


def stop_workers(workers: subprocess.Popen[bytes], seconds: float) -> None:
    """SIGTERM (a terminal's Ctrl-C may have sent SIGINT already: both drain), then
    wait for the drain, then kill what is left."""
    if workers.poll() is None:
        workers.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + seconds
    while workers.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if workers.poll() is None:
        log.warning("workers did not stop in time; killing them")
        workers.kill()
        workers.wait()
