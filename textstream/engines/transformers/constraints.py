"""Constrained decoding for the built-in engine: one llguidance matcher per request.

A request with a schema (`SamplingParams.json_schema`) gets its own `LLMatcher`,
a copy of the schema's compiled one (kept in a small LRU cache: compiling is
milliseconds to seconds, copying microseconds). Each step, sampling.py asks it
for the tokens the grammar allows next and masks the others out of that row's
logits alone; the sampled token then advances it. End-of-text is allowed only
where the grammar accepts, and the matcher stops once the grammar is complete.

The llguidance view of the tokenizer is built once per engine, at the first
constrained request (about a second for GPT-2's vocabulary), on that request's
own thread, never the batcher's.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import llguidance.hf
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer

from textstream.grammars import GrammarError, parser_limits, schema_grammar

#: Compiled grammars kept per engine (each holds its lexer: kilobytes to megabytes).
CACHED_GRAMMARS = 64

log = logging.getLogger(__name__)


class Grammars:
    """Compiled grammars of one tokenizer, by schema text."""

    def __init__(self, tokenizer: Any) -> None:
        self._hf_tokenizer = tokenizer
        self._tokenizer: LLTokenizer | None = None
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> LLTokenizer:
        if self._tokenizer is None:
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
            except ValueError as exc:  # a slow (Python) tokenizer: llguidance needs a fast one
                raise GrammarError(
                    f"this model's tokenizer cannot constrain output: {exc}"
                ) from None
        return self._tokenizer

    def matcher(self, schema: str) -> LLMatcher:
        """A fresh matcher for `schema` (canonical text); GrammarError if it
        cannot be compiled for this tokenizer."""
        with self._lock:
            compiled = self._compiled.get(schema)
            if compiled is not None:
                self._compiled.move_to_end(schema)
                return compiled.deep_copy()
            tokenizer = self._llg_tokenizer()
        # Compiled outside the lock: a big grammar must not hold up the others.
        compiled = LLMatcher(tokenizer, schema_grammar(schema), log_level=0, limits=parser_limits())
        if compiled.is_error():
            raise GrammarError(f"the schema cannot be compiled: {compiled.get_error()}")
        log.debug("compiled a grammar (%d schema characters)", len(schema))
        with self._lock:
            self._compiled[schema] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()


def allowed_tokens(matcher: LLMatcher, vocab_size: int) -> np.ndarray:
    """(vocab_size,) bool: the tokens the grammar allows next. Ids past the
    tokenizer's words (a model's padded vocabulary) are never allowed."""
    bits = np.unpackbits(
        np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little"
    )
    allowed = np.zeros(vocab_size, dtype=np.bool_)
    width = min(vocab_size, bits.shape[0])
    allowed[:width] = bits[:width]
    return allowed


def constrain(logits: torch.Tensor, matcher: LLMatcher) -> torch.Tensor:
    """logits (V,) with every token the grammar forbids at -inf.

    On CPU in numpy, on this thread: torch runs each vocabulary-sized op as an
    OpenMP parallel region, and on a busy CPU waking the pool for a few
    microseconds of work costs a millisecond (masked_fill with a bool mask was
    the worst, torch 2.13)."""
    if matcher.is_error():
        raise GrammarError(f"the output grammar failed: {matcher.get_error()}")
    allowed = allowed_tokens(matcher, logits.shape[-1])
    if logits.device.type == "cpu":
        row = logits.float().numpy()
        return torch.from_numpy(np.where(allowed, row, np.float32(-np.inf)))
    mask = torch.from_numpy(allowed).to(logits.device, non_blocking=True)
    return torch.where(mask, logits.float(), float("-inf"))


def advance(matcher: LLMatcher, token: int) -> bool:
    """Feed the sampled token to the matcher; True once the grammar is complete."""
    if not matcher.consume_token(token):
        raise GrammarError(f"the output grammar refused a token: {matcher.get_error()}")
    return bool(matcher.is_stopped())
