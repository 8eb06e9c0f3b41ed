"""A fake engine: no torch, no model. It emits words of a fixed text at a set rate,
to measure the service's own ceiling (queue, Redis, relay, SSE) with no model cost.

`MODEL_ID=fake` (50 tokens/s per stream) or `MODEL_ID=fake:<tokens per second>`.
Each word is one token; the text loops, so any max_new_tokens can be served.
A job whose output must match a schema ends with an `invalid_response_format`
error: its words would not, and an answer that ignores the schema is worse than none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from textstream.engines.base import LogprobsError
from textstream.grammars import GrammarError
from textstream.job import PromptFormat, SamplingParams, Step
from textstream.sources import served_name

#: The longest a slow fake stream sleeps before looking at `should_stop` again.
STOP_CHECK_SECONDS = 0.1

WORDS = [
    "The",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "the",
    "service",
    "streams",
    "every",
    "word",
    "of",
    "this",
    "sentence",
    "as",
    "one",
    "token",
    ",",
    "measuring",
    "how",
    "fast",
    "events",
    "travel",
    "from",
    "a",
    "worker",
    "through",
    "Redis",
    "to",
    "the",
    "client",
    ".",
]


class FakeTokenizer:
    """Token i is WORDS[i] with a leading space (as GPT-2 spells words)."""

    chat_template = None
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [0] * max(1, len(text.split()))

    def decode(
        self,
        token_ids: list[int],
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        return "".join(" " + WORDS[i % len(WORDS)] for i in token_ids)


class FakeEngine:
    """An `engines.base.Engine` whose generate() sleeps 1/rate per token."""

    def __init__(self, spec: str) -> None:
        _, _, rate = spec.partition(":")
        self.rate = float(rate) if rate else 50.0
        self.tokenizer = FakeTokenizer()
        self.name = served_name(spec)
        self.source = spec
        self.device = "cpu"
        self.prompt_format: PromptFormat = "raw"
        self.context_length = 1 << 20
        self.load_seconds = 0.0
        self.peak_batch = 0  # each fake stream only sleeps: nothing to batch

    def start_batching(self) -> bool:
        return False

    def encode_prompt(self, prompt: str, prompt_format: PromptFormat = "auto") -> list[int]:
        return self.tokenizer.encode(prompt)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        continue_final: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self.tokenizer.encode(" ".join(m["content"] for m in messages))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
        generated: int = 0,
    ) -> Generator[Step]:
        """One word every 1/rate seconds (paced against a clock, so no drift);
        after a takeover the text continues where the earlier tokens left it.
        A slow rate waits in slices, so a cancel or the deadline is seen within
        STOP_CHECK_SECONDS, not only between words."""
        if params.json_schema is not None:
            raise GrammarError("the fake engine cannot constrain its output (response_format)")
        if params.logprobs is not None:
            raise LogprobsError("the fake engine has no logprobs to give")
        interval, next_at = 1.0 / self.rate, time.monotonic()
        for produced in range(1, params.max_new_tokens + 1):
            next_at += interval
            while (delay := next_at - time.monotonic()) > 0:
                time.sleep(min(delay, STOP_CHECK_SECONDS))
                if delay > STOP_CHECK_SECONDS and should_stop():
                    return
            token = (generated + produced - 1) % len(WORDS)
            yield Step(token, "length" if produced == params.max_new_tokens else None)
            if should_stop():
                return
