"""Benchmark: the same model and parameters in-process versus through the service.

    python -m bench.pipeline [--model DIR|ID|package:...] [--tokens 64] [--runs 10]

In-process: the engine's decode loop plus incremental detokenization, in this
process (what a script calling the model directly gets). Through the service:
HTTP GET /completion -> ModelQ/Redis -> worker process -> Redis Stream -> SSE,
timed by a client reading the stream. Both run greedy with ignore_eos, so every
run produces exactly --tokens tokens. Figures are medians over --runs after one
warm-up:

- ttft_ms: request start to first token (in-process: first decoded piece).
- tokens_per_s: (tokens - 1) / (last token time - first token time), the decode
  rate (TTFT is reported separately).
- done_lag_ms (service): last token event to `done` event, at the client.

Without --model it builds GPT-2 small (124M, random weights: speed does not
depend on them) from GPT-2's real tokenizer under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import REPO, local_service, parse_sse_lines
from bench.gpt2_offline import gpt2_small
from textstream.config import Settings
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.loading import load_transformers
from textstream.job import SamplingParams
from textstream.worker.detokenize import IncrementalDetokenizer

RESULTS = REPO / "bench" / "results"
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def run_in_process(engine: TransformersEngine, params: SamplingParams) -> dict[str, float]:
    started = time.perf_counter()
    prompt_ids = engine.encode_prompt(PROMPT, "raw")
    detokenizer = IncrementalDetokenizer(engine.tokenizer)
    times: list[float] = []
    for step in engine.generate(prompt_ids, params):
        if detokenizer.add(step.token_id) or not times:
            times.append(time.perf_counter())
        last = time.perf_counter()
    tokens = len(detokenizer.ids)
    return {
        "ttft_ms": (times[0] - started) * 1000,
        "tokens_per_s": (tokens - 1) / (last - times[0]),
        "tokens": tokens,
    }


def run_service(client: httpx.Client, base: str, params: SamplingParams) -> dict[str, float]:
    query: dict[str, str | int] = {
        "max_new_tokens": params.max_new_tokens,
        "ignore_eos": "true",
        "prompt_format": "raw",
    }
    started = time.time()
    with client.stream("GET", f"{base}/completion/{PROMPT}", params=query) as resp:
        events = parse_sse_lines(resp.iter_lines())
    tokens = [e for e in events if e.event == "token"]
    done = events[-1]
    assert done.event == "done", events[-1]
    count = done.data["usage"]["completion_tokens"]
    return {
        "ttft_ms": (tokens[0].received_at - started) * 1000,
        "tokens_per_s": (count - 1) / (tokens[-1].received_at - tokens[0].received_at),
        "done_lag_ms": (done.received_at - tokens[-1].received_at) * 1000,
        "tokens": count,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="MODEL_ID to load (default: offline GPT-2 small)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads, both sides (0: default)"
    )
    args = parser.parse_args(argv)

    RESULTS.mkdir(parents=True, exist_ok=True)
    model = args.model or str(gpt2_small(RESULTS / "gpt2-small-random"))
    params = SamplingParams(max_new_tokens=args.tokens, ignore_eos=True)

    settings = Settings(
        model_id=model, model_fallback="", device=args.device, torch_threads=args.threads
    )
    engine = load_transformers(settings)
    run_in_process(engine, params)  # warm-up
    local = median_of([run_in_process(engine, params) for _ in range(args.runs)])
    del engine  # free the memory and threads before the worker starts

    threads = str(args.threads)
    service = local_service(RESULTS, model, DEVICE=args.device, TORCH_THREADS=threads)
    # One keep-alive client, as a real one: a fresh httpx client per request spends
    # ~20 ms building its SSL context, which is not the service's time.
    with service as base, httpx.Client(timeout=600) as client:
        run_service(client, base, params)  # warm-up
        served = median_of([run_service(client, base, params) for _ in range(args.runs)])

    report: dict[str, Any] = {
        "model": model,
        "device": args.device,
        "torch_threads": args.threads or "default",
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}",
        "tokens": args.tokens,
        "runs": args.runs,
        "in_process": local,
        "service": served,
        "throughput_ratio": served["tokens_per_s"] / local["tokens_per_s"],
        "added_ttft_ms": served["ttft_ms"] - local["ttft_ms"],
    }
    (RESULTS / f"pipeline-threads{args.threads}.json").write_text(json.dumps(report, indent=2))
    print(
        f"model {Path(model).name}, {args.tokens} tokens, torch threads "
        f"{args.threads or 'default'}, median of {args.runs} runs"
    )
    print(f"{'':14}{'TTFT ms':>10}{'tokens/s':>10}{'done lag ms':>13}")
    print(f"{'in-process':14}{local['ttft_ms']:>10.1f}{local['tokens_per_s']:>10.1f}{'':>13}")
    print(
        f"{'service':14}{served['ttft_ms']:>10.1f}{served['tokens_per_s']:>10.1f}"
        f"{served['done_lag_ms']:>13.2f}"
    )
    print(
        f"service / in-process tokens/s: {report['throughput_ratio'] * 100:.1f} %;"
        f" added TTFT: {report['added_ttft_ms']:+.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
