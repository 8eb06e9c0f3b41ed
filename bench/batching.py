"""Benchmark: continuous batching versus one request at a time, in one process.

    python -m bench.batching [--model DIR|ID|package:...] [--device cpu|cuda]
                             [--levels 1,8,32,64] [--tokens 64] [--rounds 1]
                             [--quantize none|int8|int4] [--compile off|start]
                             [--invariant] [--gather-ms MS]

For each level N, N threads each generate --tokens greedy tokens (ignore_eos)
from one loaded model at once, as a worker's N ModelQ threads do:

- `threads`: batching off; the N threads each run their own decode loop on the
  shared model (what `--concurrency N` does with BATCHING=off).
- `batched`: the engine's continuous batch (BATCHING=on): one forward pass per
  step for every running request; the prompts waiting at a step are prefilled
  together, in one pass (PREFILL_CHUNK_TOKENS allowing).
- `invariant` (with --invariant): `batched` with BATCH_INVARIANT=true (in
  bfloat16 on CPU the compact Llama pass attends row by row), to price it.

With --rounds R the modes take turns R times and each figure is the median
(TTFT: the median of the rounds' medians), so a busy machine slows all alike.

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
from textstream.worker.main import on_own_thread


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


def load(args: argparse.Namespace, model: str, batch_invariant: bool = False) -> TransformersEngine:
    """As a worker loads it: on a thread that ends (worker/main.py's on_own_thread),
    so no OpenMP pool stays behind to slow the batcher's."""
    return on_own_thread(
        load_transformers,
        Settings(
            batch_invariant=batch_invariant,
            model_id=model,
            model_fallback="",
            device=args.device,
            torch_threads=args.threads,
            quantize=args.quantize,
            compile=args.compile,
        ),
    )


def median_row(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="MODEL_ID to load (default: offline GPT-2 small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "int4"])
    parser.add_argument("--compile", default="off", choices=["off", "start"])
    parser.add_argument(
        "--invariant", action="store_true", help="also run batched with BATCH_INVARIANT=true"
    )
    parser.add_argument(
        "--gather-ms", type=float, default=None, help="an idle batcher's wait for a burst"
    )
    args = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    model = args.model or str(gpt2_small(RESULTS / "gpt2-small-random"))
    engine = load(args, model)
    prompt_tokens = len(engine.encode_prompt(PROMPT, "raw"))
    engines = {"threads": engine, "batched": load(args, model)}
    if args.invariant:
        engines["invariant"] = load(args, model, batch_invariant=True)
    for mode in ("batched", "invariant"):
        if mode in engines and not on_own_thread(engines[mode].start_batching):
            del engines[mode]
        elif mode in engines and args.gather_ms is not None:
            batcher = engines[mode].batcher
            assert batcher is not None
            batcher.gather_s = args.gather_ms / 1000
    levels = [int(level) for level in args.levels.split(",")]
    for each in engines.values():
        run_level(each, 1, 8)  # warm-up
    rounds: dict[str, list[list[dict[str, float]]]] = {mode: [] for mode in engines}
    for _ in range(args.rounds):
        for mode, each in engines.items():
            rounds[mode].append([run_level(each, n, args.tokens) for n in levels])
    results = {
        mode: [median_row([r[i] for r in runs]) for i in range(len(levels))]
        for mode, runs in rounds.items()
    }

    report: dict[str, Any] = {
        "model": model,
        "device": str(engine.device),
        "gpu": _gpu_name(engine),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "tokens": args.tokens,
        "prompt_tokens": prompt_tokens,
        "rounds": args.rounds,
        "quantize": args.quantize,
        "compile": args.compile,
        "results": results,
        "each_round": rounds,
    }
    (RESULTS / f"batching-{engine.device.type}.json").write_text(json.dumps(report, indent=2))
    print(
        f"model {model}, {prompt_tokens}-token prompt, {args.tokens} tokens per stream, "
        f"device {report['gpu'] or 'cpu'}, median of {args.rounds} round(s)"
    )
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
