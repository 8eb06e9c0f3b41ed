"""Benchmark: continuous batching versus one request at a time, in one process.

    python -m bench.batching [--model DIR|ID|package:...] [--device cpu|cuda]
                             [--levels 1,8,32,64] [--tokens 64]

For each level N, N threads each generate --tokens greedy tokens (ignore_eos)
from one loaded model at once, as a worker's N ModelQ threads do:

- `threads`: batching off; the N threads each run their own decode loop on the
  shared model (what `--concurrency N` does with BATCHING=off).
- `batched`: the engine's continuous batch (BATCHING=on): one forward pass per
  step for every running request.

Reports aggregate tokens/s (all tokens / wall time), per-stream tokens/s and
time to first token, and the speed-up of N streams over one. No Redis, no HTTP:
this isolates the model side; bench/serving.py measures the whole service.
Without --model it builds GPT-2 small (124M, random weights: speed does not
depend on them). Results go to bench/results/batching-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from typing import Any

from bench.gpt2_offline import gpt2_small
from bench.pipeline import PROMPT, RESULTS
from textstream.config import Settings
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.loading import load_transformers
from textstream.job import SamplingParams


def run_level(engine: TransformersEngine, streams: int, tokens: int) -> dict[str, float]:
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    prompt_ids = engine.encode_prompt(PROMPT, "raw")
    ttfts: list[float] = []
    rates: list[float] = []
    barrier = threading.Barrier(streams + 1)

    def one() -> None:
        barrier.wait()
        started = time.perf_counter()
        times = [time.perf_counter() for _ in engine.generate(prompt_ids, params)]
        ttfts.append(times[0] - started)
        rates.append((len(times) - 1) / (times[-1] - times[0]))

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "streams": streams,
        "tokens_per_s": streams * tokens / wall,
        "stream_tokens_per_s_p50": statistics.median(rates),
        "ttft_ms_p50": statistics.median(ttfts) * 1000,
        "ttft_ms_max": max(ttfts) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="MODEL_ID to load (default: offline GPT-2 small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    model = args.model or str(gpt2_small(RESULTS / "gpt2-small-random"))
    engine = load_transformers(
        Settings(model_id=model, model_fallback="", device=args.device, torch_threads=args.threads)
    )
    levels = [int(level) for level in args.levels.split(",")]
    results: dict[str, list[dict[str, float]]] = {}
    for mode in ("threads", "batched"):
        if mode == "batched" and not engine.start_batching():
            break
        run_level(engine, 1, 8)  # warm-up
        results[mode] = [run_level(engine, n, args.tokens) for n in levels]

    report: dict[str, Any] = {
        "model": model,
        "device": str(engine.device),
        "gpu": _gpu_name(engine),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "tokens": args.tokens,
        "results": results,
    }
    (RESULTS / f"batching-{engine.device.type}.json").write_text(json.dumps(report, indent=2))
    print(f"model {model}, {args.tokens} tokens per stream, device {report['gpu'] or 'cpu'}")
    print(f"{'mode':9}{'streams':>8}{'tokens/s':>10}{'x one':>7}{'per stream':>12}{'TTFT p50':>10}")
    for mode, rows in results.items():
        for row in rows:
            print(
                f"{mode:9}{row['streams']:>8}{row['tokens_per_s']:>10.1f}"
                f"{row['tokens_per_s'] / rows[0]['tokens_per_s']:>7.1f}"
                f"{row['stream_tokens_per_s_p50']:>12.1f}{row['ttft_ms_p50']:>9.0f}ms"
            )
    return 0


def _gpu_name(engine: TransformersEngine) -> str:
    if engine.device.type != "cuda":
        return ""
    import torch

    return str(torch.cuda.get_device_name(engine.device))


if __name__ == "__main__":
    raise SystemExit(main())
