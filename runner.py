"""Start textstream worker processes: `python runner.py --workers N --concurrency K`.

Each process loads the model once and runs K ModelQ threads. Ctrl-C or SIGTERM
stops them cleanly (in-flight jobs get WORKER_SHUTDOWN_GRACE seconds to finish).
`--gpus 0,1` starts one process per GPU, each seeing only its own
(CUDA_VISIBLE_DEVICES), instead of --workers.
"""

from __future__ import annotations

import argparse

from textstream.worker.main import run_workers


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
    return run_workers(args.workers, args.concurrency, args.gpus)


if __name__ == "__main__":
    raise SystemExit(main())
