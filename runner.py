"""Start textstream worker processes: `python runner.py --workers N --concurrency K`.

Each process loads the model once and runs K ModelQ threads. Ctrl-C or SIGTERM
stops them cleanly (in-flight jobs get WORKER_SHUTDOWN_GRACE seconds to finish).
`--gpus 0,1` starts one process per GPU, each seeing only its own
(CUDA_VISIBLE_DEVICES), instead of --workers.
"""

from __future__ import annotations

import argparse
import os

from tasks import serve
from textstream.config import get_settings
from textstream.logs import configure_logging
from textstream.supervisor import Supervisor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="ModelQ threads per process (default 1)"
    )
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids: one worker each")
    args = parser.parse_args(argv)
    args.gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    if args.gpus:
        args.workers = len(args.gpus)
    if args.workers < 1 or args.concurrency < 1:
        parser.error("--workers and --concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    configure_logging(settings)
    # Several processes on one CPU host would each start a full-size torch thread pool.
    cpu_threads = max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else 0
    supervisor = Supervisor(
        serve,
        (args.concurrency, cpu_threads),
        args.workers,
        settings.worker_shutdown_grace,
        gpus=args.gpus,
    )
    return supervisor.run()


if __name__ == "__main__":
    raise SystemExit(main())
