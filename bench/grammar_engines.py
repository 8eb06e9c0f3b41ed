"""Benchmark: llguidance against xgrammar, the token mask per decode step.

    python -m bench.grammar_engines [--rows 1,8] [--tokens 128]

Not run by the service: it needs xgrammar, which pulls triton (GBs) and is kept
out of the project's environment; run it in a scratch venv with xgrammar
installed without its dependencies (`uv pip install --no-deps xgrammar` and
`apache-tvm-ffi`, plus this project's requirements).

Both compile bench/schemas.py's RECORDS_SCHEMA (compact JSON, as served) for
GPT-2's tokenizer, then walk `rows` matchers along the same valid answer,
`tokens` tokens long, filling each row's bitmask at every step (one thread, row
after row, as the batcher does), then advancing each by the answer's token. Then
the same for `{"type": "object"}` (json_object), whose strings allow most of the
vocabulary. The figures are the compile time and the median (and slowest) ms per
step for all rows' masks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch
import xgrammar as xgr

from bench.gpt2_offline import gpt2_tokenizer
from bench.schemas import RECORDS_SCHEMA

RECORD = {"name": "alice", "age": 30, "email": "alice@example.com", "role": "admin", "active": True}
RECORDS = json.dumps(RECORDS_SCHEMA, separators=(",", ":"))
ANSWER = json.dumps({"people": [RECORD] * 100}, separators=(",", ":"))


def walk(fill: Any, advance: Any, rows: int, answer: list[int]) -> tuple[float, float]:
    """(median, max) ms per step to fill `rows` masks; then every row takes the token."""
    times = []
    for token in answer:
        start = time.perf_counter()
        for row in range(rows):
            fill(row)
        times.append(time.perf_counter() - start)
        for row in range(rows):
            advance(row, token)
    return statistics.median(times) * 1000, max(times) * 1000


def llguidance_figures(
    tokenizer: Any, schema: str, rows: int, answer: list[int]
) -> tuple[float, tuple[float, float]]:
    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False}
    )
    compiled = llguidance.LLMatcher(lltok, grammar, log_level=0)
    compile_s = time.perf_counter() - start
    matchers = [compiled.deep_copy() for _ in range(rows)]
    bitmask = llguidance.torch.allocate_token_bitmask(rows, lltok.vocab_size)

    def fill(row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(matchers[row], bitmask, row)

    def advance(row: int, token: int) -> None:
        assert matchers[row].consume_token(token), matchers[row].get_error()

    return compile_s, walk(fill, advance, rows, answer)


def xgrammar_figures(
    tokenizer: Any, schema: str, rows: int, answer: list[int]
) -> tuple[float, tuple[float, float]]:
    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        schema, any_whitespace=False, separators=(",", ":")
    )
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, info.vocab_size)

    def fill(row: int) -> None:
        matchers[row].fill_next_token_bitmask(bitmask, row)

    def advance(row: int, token: int) -> None:
        assert matchers[row].accept_token(token)

    return compile_s, walk(fill, advance, rows, answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = gpt2_tokenizer()
    answer = tokenizer.encode(ANSWER)[: args.tokens]
    for label, schema in (("records", RECORDS), ("json_object", '{"type":"object"}')):
        for rows in (int(r) for r in args.rows.split(",")):
            for name, figures in (
                ("llguidance", llguidance_figures),
                ("xgrammar", xgrammar_figures),
            ):
                compile_s, (median, worst) = figures(tokenizer, schema, rows, answer)
                print(
                    f"{label:11} {name:10} {rows} rows: compile {compile_s * 1000:.0f} ms"
                    f" (tokenizer included), masks {median:.3f} ms per step (max {worst:.2f})"
                )


if __name__ == "__main__":
    main()
