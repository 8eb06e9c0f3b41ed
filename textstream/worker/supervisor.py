"""Start and watch worker processes (used by runner.py).

Each worker is a separate process (spawned, not forked: torch and ModelQ's
threads do not survive a fork). A worker that dies unexpectedly is restarted; one
whose model could not load stops everything, since a restart would fail the same
way. SIGTERM/SIGINT are passed on to the workers, which drain; stragglers are
killed after the grace period, and all of them at once on a second SIGTERM/SIGINT
(a second Ctrl-C: stop now).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.process
import multiprocessing.util
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: A worker's exit code when no model could be loaded (do not restart it).
EXIT_MODEL_LOAD_FAILED = 3
#: Restarts allowed within RESTART_WINDOW seconds before giving up on a crash loop.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def _child_main(target: Callable[..., int], args: tuple[object, ...], env: dict[str, str]) -> None:
    # Before anything imports torch: CUDA_VISIBLE_DEVICES pins this process's GPU.
    os.environ.update(env)
    code = target(*args)
    # The worker has drained and deregistered. Exit without running interpreter
    # teardown: a daemon thread still inside torch (a job left for takeover) would
    # make its C++ runtime abort with "terminate called without an active exception".
    multiprocessing.util._run_finalizers()  # type: ignore[attr-defined]  # as an exit would
    logging.shutdown()
    os._exit(code)


class Supervisor:
    def __init__(
        self,
        target: Callable[..., int],
        args: tuple[object, ...],
        workers: int,
        grace: float,
        gpus: list[str] | None = None,
    ) -> None:
        """`gpus`: one worker per listed GPU, each seeing only its own."""
        self._gpus = gpus or []
        self._target = target
        self._args = args
        self._count = workers
        self._grace = grace
        self._ctx = multiprocessing.get_context("spawn")
        self._procs: dict[int, multiprocessing.process.BaseProcess] = {}
        self._restarts: list[float] = []
        self._stopping = False
        self._hurry = False

    def _start(self, index: int) -> None:
        env = {"CUDA_VISIBLE_DEVICES": self._gpus[index]} if self._gpus else {}
        proc = self._ctx.Process(
            target=_child_main, args=(self._target, self._args, env), name=f"worker-{index}"
        )
        proc.start()
        self._procs[index] = proc
        log.info("started worker-%d (pid %s)", index, proc.pid)

    def _request_stop(self, *_: object) -> None:
        if self._stopping:
            self._hurry = True  # the second Ctrl-C: stop now
        self._stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        for index in range(self._count):
            self._start(index)
        code = 0
        while not self._stopping:
            time.sleep(0.2)
            for index, proc in list(self._procs.items()):
                if proc.is_alive() or self._stopping:
                    continue
                if proc.exitcode == EXIT_MODEL_LOAD_FAILED:
                    log.error("worker-%d could not load a model; stopping all workers", index)
                    self._stopping, code = True, EXIT_MODEL_LOAD_FAILED
                    break
                now = time.monotonic()
                self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
                if len(self._restarts) > MAX_RESTARTS:
                    log.error(
                        "workers keep dying (%d restarts in a minute); giving up", MAX_RESTARTS
                    )
                    self._stopping, code = True, 1
                    break
                log.warning("worker-%d exited with %s; restarting it", index, proc.exitcode)
                self._start(index)
        self._shutdown()
        return code

    def _shutdown(self) -> None:
        for proc in self._procs.values():
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: the worker drains its in-flight jobs
        deadline = time.monotonic() + self._grace + 5
        for proc in self._procs.values():
            while proc.is_alive() and not self._hurry and time.monotonic() < deadline:
                proc.join(0.1)
            if proc.is_alive():
                if not self._hurry:
                    log.warning("worker pid %s did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.join()
        log.info("all workers stopped")
