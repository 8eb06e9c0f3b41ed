"""What a quantized model's activations should be: float32 around the kernels (the
default), or bfloat16 throughout (the model cast whole, as before 2026-12-07).

    python -m bench.activations [--model package:...gguf] [--rounds 3] [--threads 2]

The model is loaded twice by the worker's own loader (QUANTIZE=auto: the GGUF's own
types); the second copy is then cast to bfloat16 whole, which is what the int8/int4
path did before: residual stream, norms, attention and KV cache in bfloat16. For
each, side by side in interleaved rounds:

- the README question's first answer token (SmolLM2's chat template): the two
  highest logits after the prompt's prefill, and after the same prompt replayed
  with a decode step's numbers (`Passes.replay`), and the largest difference of
  any logit between the two;
- perplexity of tests/data/perplexity.txt (bench/quality.py);
- a decode step's time at 1 and 8 rows, and a 37-token prefill's, median of
  --steps after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from bench.engine_vs_llamacpp import SMOLLM2
from bench.quality import TEXT, perplexity
from textstream.config import Settings
from textstream.engines.transformers.loading import load_transformers

QUESTION = "What is the capital of France?"


def top_two(engine: Any, logits: torch.Tensor) -> str:
    values, ids = logits[0].float().topk(2)
    return ", ".join(
        f"{engine.tokenizer.decode([int(i)])!r} {float(v):.3f}"
        for i, v in zip(ids, values, strict=True)
    )


def first_token(engine: Any) -> dict[str, str]:
    passes = engine.passes
    ids = engine.encode_prompt(QUESTION, "chat")
    with torch.inference_mode():
        prefilled = passes.prefill(passes.new_cache(1, 128), [ids], [0]).float()
        replayed = passes.replay(passes.new_cache(1, 128), ids, 0, 256).float()
    return {
        "prefill": top_two(engine, prefilled),
        "replay": top_two(engine, replayed),
        "largest difference": f"{float((prefilled - replayed).abs().max()):.3f}",
    }


def timings(engine: Any, steps: int) -> dict[str, float]:
    passes = engine.passes
    prompt = engine.encode_prompt(QUESTION, "chat")
    out: dict[str, float] = {}
    with torch.inference_mode():
        for rows in (1, 8):
            cache = passes.new_cache(rows, 256)
            passes.prefill(cache, [prompt] * rows, [0] * rows)
            times = []
            for step in range(steps + 1):
                started = time.perf_counter()
                passes.decode(cache, [5] * rows, [len(prompt) + step] * rows)
                times.append(time.perf_counter() - started)
            out[f"decode step, {rows} row(s), ms"] = statistics.median(times[1:]) * 1000
        times = []
        for _ in range(5):
            started = time.perf_counter()
            passes.prefill(passes.new_cache(1, 128), [prompt], [0])
            times.append(time.perf_counter() - started)
        out[f"prefill of {len(prompt)} tokens, ms"] = statistics.median(times) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings(model_id=args.model, model_fallback="", quantize="auto", _env_file=None)
    engines = {"float32 (default)": load_transformers(settings)}
    cast = load_transformers(settings)
    cast.model.to(torch.bfloat16)  # what quantize_linears did before
    engines["bfloat16 throughout"] = cast
    ids = engines["float32 (default)"].tokenizer(TEXT.read_text())["input_ids"]
    for name, engine in engines.items():
        print(f"{name}: {first_token(engine)}; perplexity {perplexity(engine.model, ids):.3f}")
    for round_no in range(args.rounds):
        for name, engine in engines.items():
            figures = ", ".join(f"{k} {v:.1f}" for k, v in timings(engine, args.steps).items())
            print(f"round {round_no + 1} {name}: {figures}", flush=True)


if __name__ == "__main__":
    main()
