"""Serving benchmark, in the style of vLLM's benchmark_serving.

    python -m bench.serving [--model fake:50|gpt2-small|ID|DIR] [--workers 2] [--slots 32]
                            [--levels 1,8,32,64] [--tokens 64] [--streams 0]
                            [--batching auto|off] [--device cpu|cuda] [--in-process]

For each concurrency level it keeps that many streams open against one API
process (each client sends its next request as soon as the last ends) and reports
TTFT, TPOT, inter-token latency and end-to-end latency (p50/p90/p99), requests/s
and output tokens/s. `--streams N` then holds N streams at once and reports the
relay rate (tokens/s delivered to clients) and errors. With the fake engine
(`--model fake:<tokens/s>`, no torch) it measures the service's own ceiling.
`--model gpt2-small` builds GPT-2 small with random weights (speed does not
depend on them). `--batching off` gives each slot its own decode loop instead of
one continuous batch. `--in-process` first runs the same levels against the
model loaded in this process (bench/batching.py, same slots and batching) and
reports the service's tokens/s as a share of that: the service overhead.
Results go to bench/results/serving.json, and a PNG plot when matplotlib is
installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import REPO, local_service
from bench.gpt2_offline import gpt2_small

RESULTS = REPO / "bench" / "results"


def timings(started: float, times: list[float], done: bool) -> dict[str, Any]:
    """One request's figures from when it started and when each token arrived."""
    if not done or not times:
        return {"error": "stream ended without done"}
    end = time.perf_counter()
    return {
        "ttft": times[0] - started,
        "e2e": end - started,
        "itl": [b - a for a, b in pairwise(times)],
        "tokens": len(times),
        "times": times,
    }


async def one_request(client: httpx.AsyncClient, tokens: int, i: int) -> dict[str, Any]:
    params: dict[str, str | int] = {
        "max_new_tokens": tokens,
        "ignore_eos": "true",
        "use_cache": "false",
    }
    started, times, event, done = time.perf_counter(), [], "", False
    try:
        async with client.stream("GET", f"/completion/request {i}", params=params) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}"}
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "token":
                    times.append(time.perf_counter())
                elif line.startswith("data: ") and event in ("done", "error"):
                    done = event == "done"
                    break
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    return timings(started, times, done)


async def one_request_raw(base: str, tokens: int, i: int) -> dict[str, Any]:
    """`one_request` over a bare asyncio connection: one HTTP/1.1 GET, the chunked
    SSE body parsed line by line. A tenth of httpx's CPU per stream, so a client
    holding 1,000 streams on the service's own cores measures the service rather
    than itself (`--client raw` in bench.relay)."""
    url = httpx.URL(base)
    query = f"max_new_tokens={tokens}&ignore_eos=true&use_cache=false"
    request = (
        f"GET /completion/request%20{i}?{query} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
        "Accept: text/event-stream\r\nConnection: close\r\n\r\n"
    ).encode()
    started, times, event, done = time.perf_counter(), [], "", False
    try:
        reader, writer = await asyncio.open_connection(url.host, url.port)
    except OSError as exc:
        return {"error": type(exc).__name__}
    try:
        writer.write(request)
        status = (await reader.readline()).split(b" ", 2)
        if len(status) < 2 or status[1] != b"200":
            return {"error": f"HTTP {status[1].decode() if len(status) > 1 else '?'}"}
        chunked = False
        while (header := await reader.readline()) not in (b"\r\n", b""):
            chunked |= header.lower().startswith(b"transfer-encoding: chunked")
        pending = b""
        while not done:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                body = await reader.readexactly(size + 2)
                pending += body[:-2]
            else:
                body = await reader.read(65536)
                if not body:
                    break
                pending += body
            *lines, pending = pending.split(b"\n")
            for line in (raw.rstrip(b"\r") for raw in lines):  # SSE lines may end CRLF
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: ") and event == "token":
                    times.append(time.perf_counter())
                elif line.startswith(b"data: ") and event in ("done", "error"):
                    done = event == "done"
                    break
            if event == "error":
                break
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return {"error": type(exc).__name__}
    finally:
        writer.close()
    return timings(started, times, done)


async def run_level(
    base: str, level: int, requests: int, tokens: int, client_kind: str = "httpx"
) -> list[dict[str, Any]]:
    """`level` users sending `requests` requests in all, each its next as soon as
    its last has ended; `client_kind` "raw" uses one_request_raw."""
    limits = httpx.Limits(max_connections=level + 8, max_keepalive_connections=level + 8)
    counter = iter(range(requests))
    results: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600) as client:

        async def user() -> None:
            for i in counter:
                if client_kind == "raw":
                    results.append(await one_request_raw(base, tokens, i))
                else:
                    results.append(await one_request(client, tokens, i))

        await asyncio.gather(*(user() for _ in range(level)))
    return results


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000 if ordered else 0.0


def summarize(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    itl = [x for r in ok for x in r["itl"]]
    out: dict[str, Any] = {"requests": len(results), "errors": len(results) - len(ok)}
    kinds = Counter(r["error"] for r in results if "error" in r)
    if kinds:
        out["error_kinds"] = dict(kinds)
    for name, values in (
        ("ttft", [r["ttft"] for r in ok]),
        ("tpot", tpot),
        ("itl", itl),
        ("e2e", [r["e2e"] for r in ok]),
    ):
        out[name + "_ms"] = {f"p{q}": round(pct(values, q), 2) for q in (50, 90, 99)}
        out[name + "_ms"]["mean"] = round(statistics.fmean(values) * 1000, 2) if values else 0.0
    out["requests_per_s"] = round(len(ok) / seconds, 2)
    out["output_tokens_per_s"] = round(sum(r["tokens"] for r in ok) / seconds, 1)
    # While every stream was open at once (after the last first token, before the
    # first last token): the relay rate without the ramp-up and the tail.
    if ok:
        start, end = max(r["times"][0] for r in ok), min(r["times"][-1] for r in ok)
        if end > start:
            during = sum(start <= t <= end for r in ok for t in r["times"])
            out["all_open_seconds"] = round(end - start, 2)
            out["all_open_tokens_per_s"] = round(during / (end - start), 1)
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    levels = [row["concurrency"] for row in report["levels"]]
    if not levels:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(levels, [r["output_tokens_per_s"] for r in report["levels"]], marker="o")
    left.set(
        xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput", xscale="log"
    )
    for key in ("ttft_ms", "itl_ms"):
        right.plot(
            levels, [r[key]["p50"] for r in report["levels"]], marker="o", label=key + " p50"
        )
        right.plot(
            levels, [r[key]["p99"] for r in report["levels"]], marker="x", label=key + " p99"
        )
    right.set(xlabel="concurrent streams", ylabel="ms", title="Latency", xscale="log", yscale="log")
    right.legend()
    fig.suptitle(f"textstream serving: {report['model']}, {report['workers']} worker(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def in_process(args: argparse.Namespace, levels: list[int]) -> dict[int, float]:
    """Tokens/s at each level with the model in this process, as one worker runs it."""
    from bench import batching
    from textstream.config import Settings
    from textstream.engines.transformers.loading import load_transformers
    from textstream.worker.main import on_own_thread

    def prepare() -> Any:  # as a worker does: on a thread that ends (no OpenMP pool left)
        engine = load_transformers(
            Settings(model_id=args.model, model_fallback="", device=args.device)
        )
        if args.slots > 1 and args.batching == "auto":
            engine.start_batching()
        return engine

    engine = on_own_thread(prepare)
    batching.run_level(engine, 1, 8)  # warm-up
    rates = {n: batching.run_level(engine, n, args.tokens)["tokens_per_s"] for n in levels}
    # The batcher's idle thread keeps the model in memory; it no longer uses CPU.
    del engine
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="fake:50")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=32, help="ModelQ threads per worker")
    parser.add_argument("--levels", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=0, help="hold this many streams at once")
    parser.add_argument("--batching", default="auto", choices=["auto", "off"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--in-process", action="store_true", help="also run the levels in-process")
    args = parser.parse_args(argv)
    if args.model == "gpt2-small":
        args.model = str(gpt2_small(RESULTS / "gpt2-small-random"))
    levels = [int(x) for x in args.levels.split(",") if x]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "model": args.model,
        "workers": args.workers,
        "slots_per_worker": args.slots,
        "batching": args.batching,
        "device": args.device,
        "tokens": args.tokens,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "levels": [],
    }
    local = in_process(args, levels) if args.in_process else {}
    service = local_service(
        RESULTS,
        args.model,
        args.workers,
        args.slots,
        MAX_QUEUED_JOBS="100000",
        BATCHING=args.batching,
        DEVICE=args.device,
    )
    with service as base:
        for level in levels:
            started = time.perf_counter()
            results = asyncio.run(run_level(base, level, max(2 * level, 8), args.tokens))
            row = {"concurrency": level, **summarize(results, time.perf_counter() - started)}
            if level in local:
                row["in_process_tokens_per_s"] = round(local[level], 1)
                row["service_ratio"] = round(row["output_tokens_per_s"] / local[level], 3)
            report["levels"].append(row)
            print(
                f"c={level:4d}  req/s {row['requests_per_s']:8.2f}  "
                f"tok/s {row['output_tokens_per_s']:9.1f}  "
                f"TTFT p50/p99 {row['ttft_ms']['p50']:.1f}/{row['ttft_ms']['p99']:.1f} ms  "
                f"ITL p50/p99 {row['itl_ms']['p50']:.1f}/{row['itl_ms']['p99']:.1f} ms  "
                f"errors {row['errors']}"
                + (f"  in-process tok/s {local[level]:.1f}" if level in local else "")
            )
        if args.streams:
            started = time.perf_counter()
            results = asyncio.run(run_level(base, args.streams, args.streams, args.tokens))
            row = {"streams": args.streams, **summarize(results, time.perf_counter() - started)}
            report["relay"] = row
            print(
                f"{args.streams} streams at once: "
                f"relayed {row['output_tokens_per_s']:.0f} tokens/s over the run, "
                f"{row.get('all_open_tokens_per_s', 0):.0f} while all were open, "
                f"errors {row['errors']}, TTFT p99 {row['ttft_ms']['p99']:.0f} ms"
            )
    name = Path(args.model).name.replace(":", "-") + ("-nobatch" if args.batching == "off" else "")
    out = RESULTS / f"serving-{name}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"results: {out}")
    plot(report, RESULTS / f"serving-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
