"""Benchmark: what QUANTIZE costs in quality, on a GGUF model and a fixed text.

    python -m bench.quality [--model package:...gguf] [--variants none,auto,int8,int4]
        [--llama-server PATH] [--tokens 32] [--threads 2]

For each QUANTIZE variant the worker's own loader (load_transformers) builds the
model, and two things are measured:

- perplexity of tests/data/perplexity.txt (public-domain prose, ~750 tokens), the
  whole text as one sequence, every linear layer through the kernel a decode step
  uses (so what a generated token sees);
- greedy continuations of PROMPTS, --tokens each, through the engine's own
  decode (`engine.generate`, as a worker runs it), compared token by token with
  the float32 model's and, with --llama-server, with llama.cpp's on the same
  file (/completion, temperature 0, the same prompt's text): how many of the
  prompts agree throughout, and the mean number of tokens before the first
  difference.

`none` is transformers' dequantized float32 model (the file's values in float);
`auto`, the default, keeps the GGUF's own types (Q4_1 layers int4, the Q8_0 head
int8); `int4` makes every layer int4, `int8` every layer int8. Results go to
bench/results/quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.cluster import REPO
from bench.engine_vs_llamacpp import SMOLLM2
from textstream.config import Settings
from textstream.engines.transformers.loading import load_transformers
from textstream.job import SamplingParams

TEXT = REPO / "tests" / "data" / "perplexity.txt"
RESULTS = REPO / "bench" / "results"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water is made of",
    "In 1969, the first people to walk on the Moon",
]


def perplexity(model: Any, ids: list[int]) -> float:
    """exp(mean cross-entropy) of `ids` as one sequence, every layer as decode runs it."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(loss.item())


def greedy(engine: Any, prompt: str, tokens: int) -> list[int]:
    """The engine's greedy ids for `prompt`, through its own decode loop."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    ids = engine.encode_prompt(prompt, "raw")
    return [step.token_id for step in engine.generate(ids, params)]


def llama_greedy(base: str, prompt: str, tokens: int) -> list[int]:
    body = {
        "prompt": prompt,
        "n_predict": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
        "return_tokens": True,
    }
    answer = httpx.post(f"{base}/completion", json=body, timeout=120).json()
    return list(answer["tokens"])[:tokens]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    firsts = []
    for a, b in zip(ours, theirs, strict=True):
        same = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        firsts.append(same)
    return {
        "identical": sum(a == b for a, b in zip(ours, theirs, strict=True)),
        "prompts": len(ours),
        "mean_tokens_before_first_difference": sum(firsts) / len(firsts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--variants", default="none,auto,int8,int4")
    parser.add_argument("--llama-server", default="")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    llama: list[list[int]] | None = None
    if args.llama_server:
        from bench.engine_vs_llamacpp import start_llama_server
        from textstream.sources import ModelSource

        source = ModelSource.parse(args.model)
        assert source.gguf_file, "--llama-server needs a GGUF --model"
        log = RESULTS / "quality-llama-server.log"
        proc, base = start_llama_server(
            args.llama_server, Path(source.path) / source.gguf_file, args.threads, 1, log
        )
        try:
            llama = [llama_greedy(base, p, args.tokens) for p in PROMPTS]
        finally:
            proc.terminate()
            proc.wait(30)

    rows: dict[str, dict[str, Any]] = {}
    reference: list[list[int]] | None = None
    for variant in args.variants.split(","):
        settings = Settings(
            model_id=args.model,
            model_fallback="",
            quantize=variant,
            torch_threads=args.threads,
            _env_file=None,  # type: ignore[call-arg]
        )
        engine = load_transformers(settings)
        ids = engine.tokenizer(TEXT.read_text())["input_ids"]
        outs = [greedy(engine, p, args.tokens) for p in PROMPTS]
        reference = reference if reference is not None else outs
        row: dict[str, Any] = {
            "perplexity": round(perplexity(engine.model, ids), 3),
            "text_tokens": len(ids),
            "vs_first_variant": agreement(outs, reference),
        }
        if llama is not None:
            row["vs_llama_server"] = agreement(outs, llama)
        rows[variant] = row
        print(variant, json.dumps(row), flush=True)

    cpuinfo = Path("/proc/cpuinfo").read_text()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        platform.processor(),
    )
    result = {
        "model": args.model,
        "cpu": cpu,
        "avx512f": "avx512f" in cpuinfo,
        "threads": args.threads,
        "tokens": args.tokens,
        "variants": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(result, indent=2))
    print(f"\n{args.model}: {cpu}, avx512f={result['avx512f']}")
    print("| QUANTIZE | perplexity | greedy = first variant's | = llama-server's |")
    for variant, row in rows.items():
        first = row["vs_first_variant"]
        ll = row.get("vs_llama_server")
        ll_text = "-"
        if ll:
            before = ll["mean_tokens_before_first_difference"]
            ll_text = f"{ll['identical']}/{ll['prompts']} ({before:.1f})"
        print(
            f"| {variant} | {row['perplexity']} | {first['identical']}/{first['prompts']} "
            f"({first['mean_tokens_before_first_difference']:.1f}) | {ll_text} |"
        )


if __name__ == "__main__":
    main()
