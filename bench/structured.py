"""Benchmark: what a JSON schema costs per decode step of the continuous batch.

    python -m bench.structured [--model DIR|ID] [--levels 1,8] [--tokens 64] [--rounds 3]

For each level N, N threads each generate --tokens greedy tokens from one loaded
model through the engine's continuous batch, as a worker's N ModelQ threads do:
`free` without a schema, `schema` with RECORDS (bench/schemas.py: an array of at least 100 small
records: the rows all run the full --tokens, so the batch keeps N rows). The
grammar is compiled before timing (the worker caches it per schema), so the
figure is the per-step cost: each constrained row's token mask (llguidance),
its application to the row's logits, and the matcher's advance.

Also reports the mask alone (`allowed_tokens`, ms per row per step) along a
RECORDS answer. Without --model it builds GPT-2 small (124M, random weights:
speed does not depend on them). Figures go to BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from pathlib import Path

from bench.gpt2_offline import gpt2_small
from bench.schemas import RECORDS_SCHEMA
from textstream.config import Settings
from textstream.engines.transformers.constraints import advance, allowed_tokens
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.loading import load_transformers
from textstream.grammars import canonical_schema
from textstream.job import SamplingParams
from textstream.worker.main import on_own_thread

RECORDS = canonical_schema(RECORDS_SCHEMA)

PROMPT = "Here are the people in the team, as JSON:"


def run_level(engine: TransformersEngine, n: int, tokens: int, schema: str | None) -> float:
    """ms per decode step with n rows generating `tokens` each."""
    params = SamplingParams(
        max_new_tokens=tokens, temperature=0, ignore_eos=schema is None, json_schema=schema
    )
    ids = engine.encode_prompt(PROMPT)
    batcher = engine.batcher
    assert batcher is not None
    counts: list[int] = []

    def one() -> None:
        counts.append(sum(1 for _ in engine.generate(ids, params)))

    threads = [threading.Thread(target=one) for _ in range(n)]
    steps0, start = batcher.steps, time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, steps = time.perf_counter() - start, batcher.steps - steps0
    assert counts == [tokens] * n, counts  # every row ran the full length
    return elapsed / steps * 1000


def mask_ms(engine: TransformersEngine, tokens: int) -> float:
    """The mask alone (ms per row per step) along a greedy RECORDS answer."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0, json_schema=RECORDS)
    answer = [s.token_id for s in engine.generate(engine.encode_prompt(PROMPT), params)]
    matcher = engine.grammars.matcher(RECORDS)
    vocab = engine.model.config.vocab_size
    times = []
    for token in answer:
        start = time.perf_counter()
        allowed_tokens(matcher, vocab)
        times.append(time.perf_counter() - start)
        advance(matcher, token)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--levels", default="1,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = args.model or str(gpt2_small(Path("/tmp/textstream-bench-gpt2-small")))
    engine = on_own_thread(
        load_transformers, Settings(model_id=model, model_fallback="", device="cpu")
    )
    assert engine.start_batching()
    engine.grammars.matcher(RECORDS)  # compiled once, as the worker's cache does
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"mask alone: {mask_ms(engine, args.tokens):.3f} ms per row per step (median)")
    for n in (int(level) for level in args.levels.split(",")):
        run_level(engine, n, 8, None)  # warm this batch shape
        run_level(engine, n, 8, RECORDS)
        free, constrained = [], []
        for _ in range(args.rounds):  # alternated, so a busy machine slows both alike
            free.append(run_level(engine, n, args.tokens, None))
            constrained.append(run_level(engine, n, args.tokens, RECORDS))
        f, c = statistics.median(free), statistics.median(constrained)
        print(
            f"{n} rows: free {f:.2f} ms/step, schema {c:.2f} ms/step, "
            f"{(c / f - 1) * 100:+.1f}% (median of {args.rounds})"
        )


if __name__ == "__main__":
    main()
