"""GPT-2 as the seed has it: the built-in engine beside transformers' `generate`.

    python -m bench.gpt2_generate [--tokens 128] [--rounds 3] [--threads 2]

`MODEL_ID` pointing at a local GPT-2 small directory (124M; random weights with
GPT-2's real tokenizer, bench/gpt2_offline.py: speed does not depend on weights)
is loaded once per setting the way a worker loads it (`load_transformers`), and
one process measures, in turns (each round runs every variant once, so a busy
machine slows all alike):

- `generate`: transformers' `model.generate` on the engine's own model object
  (greedy, KV cache on, `max_new_tokens` --tokens, `min_new_tokens` the same);
- `engine`: the engine's decode loop alone (QUANTIZE=auto, the default: a float
  checkpoint stays float32), then `engine int8` (QUANTIZE=int8) and `batched` (the
  default loop of a worker with slots: the continuous batch, one stream).

Each figure is a greedy stream's decode rate, (tokens - 1) / (last - first token),
the median over the rounds, and its range. It also reports whether the engine's
greedy tokens equal `generate`'s (float32: they must). Results go to
bench/results/gpt2_generate.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config

from bench.gpt2_offline import save_gpt2
from textstream.config import Settings
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.loading import load_transformers
from textstream.job import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "The history of the city begins with a small settlement on the river, where"


def timed_engine(
    engine: TransformersEngine, ids: list[int], tokens: int
) -> tuple[float, list[int]]:
    params = SamplingParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)
    stamps: list[float] = []
    out: list[int] = []
    for step in engine.generate(ids, params):
        stamps.append(time.perf_counter())
        out.append(step.token_id)
    return (len(out) - 1) / (stamps[-1] - stamps[0]), out


def timed_generate(
    engine: TransformersEngine, ids: list[int], tokens: int
) -> tuple[float, list[int]]:
    """transformers' generate, its per-token times from a streamer's put() calls."""
    stamps: list[float] = []

    class Clock:
        def put(self, value: torch.Tensor) -> None:
            stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    with torch.inference_mode():
        output = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            pad_token_id=engine.tokenizer.eos_token_id,
            streamer=Clock(),
        )
    stamps = stamps[1:]  # the first put() is the prompt
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), output[0, len(ids) :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gpt2"
        save_gpt2(model_dir, GPT2Config())  # GPT-2 small's shape: 124M parameters

        def load(**settings: Any) -> TransformersEngine:
            return load_transformers(
                Settings(model_id=str(model_dir), model_fallback="", _env_file=None, **settings)  # type: ignore[arg-type]
            )

        engines = {"engine": load(), "engine int8": load(quantize="int8"), "batched": load()}
        engines["batched"].start_batching()
        ids = engines["engine"].encode_prompt(PROMPT)
        rates: dict[str, list[float]] = {name: [] for name in ["generate", *engines]}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            rate, tokens["generate"] = timed_generate(engines["engine"], ids, args.tokens)
            rates["generate"].append(rate)
            for name, engine in engines.items():
                rate, tokens[name] = timed_engine(engine, ids, args.tokens)
                rates[name].append(rate)
    rows = []
    base = statistics.median(rates["generate"])
    print(
        f"GPT-2 small (124M), {args.tokens} greedy tokens, {args.threads} threads, "
        f"median of {args.rounds} rounds"
    )
    for name, values in rates.items():
        median = statistics.median(values)
        same = tokens[name] == tokens["generate"]
        rows.append(
            {
                "variant": name,
                "tokens_per_s": round(median, 1),
                "range": [round(min(values), 1), round(max(values), 1)],
                "x_generate": round(median / base, 2),
                "tokens_equal_generate": same,
            }
        )
        print(
            f"{name:<12} {median:6.1f} tok/s ({min(values):.1f}-{max(values):.1f})  "
            f"x{median / base:.2f} generate   greedy tokens {'=' if same else '!='} generate's"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.machine()} {platform.processor()}", "rows": rows, **vars(args)}
    (RESULTS / "gpt2_generate.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
