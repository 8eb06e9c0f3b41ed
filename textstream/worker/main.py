"""One worker process's main: load the engine once, register the
`generate_completion` task on a ModelQ instance with a unique server id, start
`concurrency` ModelQ threads, heartbeat, and on SIGTERM/SIGINT drain and leave.

The supervisor (supervisor.py, started by `runner.py`) runs one `serve()` per
worker process; the task body is completion.py.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from textstream import keys
from textstream.config import Settings, get_settings
from textstream.connections import sync_client, sync_streams_client
from textstream.engines import load_engine
from textstream.engines.base import AnyEngine
from textstream.logs import configure_logging
from textstream.registry import WorkerHeartbeat, WorkerInfo
from textstream.sources import ModelLoadError, served_name
from textstream.worker.completion import CompletionRunner
from textstream.worker.queue import WorkerModelQ, create_worker_modelq, new_server_id
from textstream.worker.supervisor import EXIT_MODEL_LOAD_FAILED, Supervisor
from textstream.worker.writer import StreamFlusher

log = logging.getLogger(__name__)

T = TypeVar("T")


def serve(concurrency: int = 1, cpu_threads: int = 0) -> int:
    """Run one worker process until SIGTERM/SIGINT; returns its exit code."""
    settings = get_settings()
    configure_logging(settings)
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        if stop.is_set():
            # A second Ctrl-C: stop now. Jobs left running stay in ModelQ's custody
            # and are taken over (TAKEOVER_AFTER_SECONDS) by another worker.
            logging.shutdown()
            os._exit(128 + signal.SIGINT)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    if cpu_threads and not settings.torch_threads:
        # Several worker processes share this host's cores (runner.py's share).
        settings = settings.model_copy(update={"torch_threads": cpu_threads})
    try:
        engine, batching = on_own_thread(prepare_engine, settings, concurrency)
    except ModelLoadError as exc:
        log.error("worker cannot start: %s", exc)
        return EXIT_MODEL_LOAD_FAILED
    # What is loaded by now (torch, transformers, the model's modules: ~400,000
    # objects) lives as long as the process. Out of the collector's sight, a full
    # collection takes well under a millisecond instead of 0.46 s, a pause that
    # holds every thread of the worker, its heartbeat's too, and so bounds how soon
    # a silent worker may be taken over (TAKEOVER_AFTER_SECONDS; BENCHMARKS.md).
    gc.freeze()

    server_id = new_server_id()
    client = sync_client(settings)
    heartbeat = WorkerHeartbeat(
        client,
        WorkerInfo(
            worker_id=server_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=engine.name,
            device=str(engine.device),
            slots=concurrency,
            batching=batching,
            model_source=engine.source,
            context_length=engine.context_length,
            prompt_format=engine.prompt_format,
            load_seconds=round(engine.load_seconds, 3),
            fallback_for=fallback_for(settings, engine.name),
        ),
        settings.worker_heartbeat_seconds,
    )
    streams = client if settings.streams_shared else sync_streams_client(settings)
    flusher = StreamFlusher(streams, settings.stream_flush_ms) if settings.stream_flush_ms else None
    runner = CompletionRunner(engine, client, settings, heartbeat, streams, flusher)
    mq = create_worker_modelq(settings, server_id, engine.name, runner.run)
    mq.start_workers(concurrency)
    heartbeat.start()
    log.info(
        "worker %s serving model=%s device=%s slots=%d batching=%s",
        server_id,
        engine.name,
        engine.device,
        concurrency,
        batching,
    )
    while not stop.is_set():
        try:
            heartbeat.beat()  # first beat now, so /health sees the worker at once
            break
        except Exception as exc:  # Redis not up yet: keep trying until told to stop
            log.warning("cannot reach Redis yet: %s", exc)
            stop.wait(1.0)
    stop.wait()
    return drain(mq, runner, heartbeat, settings.worker_shutdown_grace)


def fallback_for(settings: Settings, served: str) -> str:
    """The name the API expects this worker to serve (api/models.configured_model),
    when it serves another: it loaded MODEL_FALLBACK. The API then sends requests
    and queued jobs for that name here instead of letting them wait for nobody."""
    expected = settings.served_model_name or served_name(settings.model_id)
    return expected if expected != served else ""


def prepare_engine(settings: Settings, concurrency: int) -> tuple[AnyEngine, bool]:
    """Load the engine (and warm it up), and start its batch where it has one;
    returns it and whether it batches."""
    engine = load_engine(settings)
    if settings.served_model_name:
        engine.name = settings.served_model_name  # what clients name in `model`
    batching = concurrency > 1 and settings.batching == "auto" and engine.start_batching()
    return engine, batching


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a thread that ends with it (its exception raised here).

    Why: a thread's first OpenMP parallel region (any torch operation big enough to
    split) gives that thread an OpenMP pool for as long as it lives, and once the
    pools hold more threads than the host has CPUs, libgomp stops spinning between
    regions: each of a decode step's ~1,000 regions then waits for a sleeping thread
    to wake, and a step takes twice as long (BENCHMARKS.md). Loading on the main
    thread, which lives on, left a pool there beside the batcher's. Run on a thread
    that ends, the load leaves none: the batcher's (or, without a batch, the one
    ModelQ thread's) is the only one."""
    with ThreadPoolExecutor(1, thread_name_prefix="engine-load") as pool:
        return pool.submit(fn, *args).result()  # leaving `with` ends the thread


def drain(
    mq: WorkerModelQ, runner: CompletionRunner, heartbeat: WorkerHeartbeat, grace: float
) -> int:
    """Stop claiming jobs, let running ones finish within `grace` seconds, deregister.

    Jobs still running at the deadline are not lost: they stay in ModelQ's custody
    list, their heartbeats stop with this process, and another worker takes them
    over from the tokens already published."""
    log.info(
        "worker %s stopping: draining %d job(s) for up to %g s",
        heartbeat.info.worker_id,
        heartbeat.info.busy,
        grace,
    )
    runner.draining.set()  # a job claimed from now on is left for another worker
    mq.draining.set()  # ModelQ threads stop claiming, quietly
    deadline = time.monotonic() + grace
    while heartbeat.info.busy > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    if heartbeat.info.busy:
        log.warning("worker stopping with %d job(s) unfinished", heartbeat.info.busy)
    runner.metrics.close()  # the last jobs' figures, gathered and not yet written
    heartbeat.stop()
    try:
        # Leaving ModelQ's server registry lets other workers reclaim anything we held.
        mq.redis_client.hdel(keys.MODELQ_SERVERS, heartbeat.info.worker_id)
    except Exception as exc:
        log.warning("could not deregister from ModelQ: %s", exc)
    return 0


def run_workers(workers: int, concurrency: int, gpus: list[str] | None = None) -> int:
    """Start `workers` worker processes (one per GPU with `gpus`), each serving
    `concurrency` slots, and watch them until SIGTERM/SIGINT; returns the exit code."""
    settings = get_settings()
    configure_logging(settings)
    workers = len(gpus) if gpus else workers
    # Several processes on one CPU host would each start a full-size torch thread pool.
    cpu_threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    supervisor = Supervisor(
        serve, (concurrency, cpu_threads), workers, settings.worker_shutdown_grace, gpus=gpus
    )
    return supervisor.run()
