"""The two forward passes both decode loops run, on a `SlotCache` (kvcache.py).

- `prefill`: the next chunk of R prompts at once, (R, n) tokens right-padded,
  row r's written at columns offset_r.. (its tokens so far); returns each row's
  logits (R, V) at its last real token. Run eagerly: its shapes vary.
- `decode`: one token for each of R sequences, (R, 1), row r's at column
  length_r; returns (R, V). This is the step every token pays, so it is the one
  compiled (`compile_decode`, when COMPILE allows): it has two shapes only, R and
  the attention width, both traced as dynamic sizes.

Each row gets its own position ids and its own mask row, so a sequence computes
the same thing whichever rows run beside it, up to float rounding: the batch
contract. A padded query (past a row's last prompt token) attends to the columns
up to its own, never to nothing, so it stays finite, and its output is ignored.

The mask is built for the model's attention implementation: boolean for `sdpa`
(True: attend), additive for `eager`; other implementations take no 4-D mask,
and `supports_slots` refuses them.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from textstream.engines.transformers.kvcache import SlotCache
from textstream.engines.transformers.llama import compact_pass
from textstream.engines.transformers.quantize import prefilling

log = logging.getLogger(__name__)

#: Attention implementations that take the 4-D mask these passes build.
MASKED_ATTENTION = ("sdpa", "eager")

Forward = Callable[..., torch.Tensor]


def supports_slots(model: Any) -> bool:
    """A plain full-attention KV cache (no sliding window, no recurrent state) and an
    attention that takes an explicit mask: what SlotCache and these passes need."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    config = model.config
    if getattr(config, "_attn_implementation", None) not in MASKED_ATTENTION:
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # an unusual config: let the caller fall back
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _forward(
    model: Any,
    cache: SlotCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    columns: torch.Tensor,
    mask: torch.Tensor,
    keep: int | torch.Tensor,
) -> torch.Tensor:
    """tokens, positions, columns: (R, n); mask (R, 1, n, width). Returns (R, V)."""
    cache.set_plan(columns, mask)
    out = model(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return out.logits[:, -1, :]  # type: ignore[no-any-return]


class Passes:
    """One model's prefill and decode passes (shared by every decode loop)."""

    def __init__(
        self,
        model: Any,
        device: torch.device,
        context_length: int,
        *,
        compact: bool = True,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.context_length = context_length
        config = model.config.get_text_config(decoder=True)
        self.num_layers = int(config.num_hidden_layers)
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self._additive = getattr(model.config, "_attn_implementation", "") == "eager"
        # Both passes run the compact Llama pass where it fits the model (llama.py:
        # the same numbers with a fraction of the per-layer overhead), else
        # transformers' own forward.
        fast = compact_pass(model) if compact and not self._additive else None
        if fast is not None:
            fast.batch_invariant = batch_invariant
        #: Whether the compact pass attends row by row in bfloat16 (BATCH_INVARIANT).
        self.batch_invariant = fast is not None and batch_invariant
        self._forward: Forward = fast or functools.partial(_forward, model)
        #: The compact pass, which can replay tokens with a decode step's numbers.
        self._compact = fast
        self._decode: Forward = self._forward
        #: "eager", "compiling", "compiled" or "failed" (reported in the log).
        self.decode_mode = "eager"

    def new_cache(self, rows: int = 1, columns: int = 256) -> SlotCache:
        return SlotCache(self.num_layers, rows, columns)

    def _mask(self, columns: torch.Tensor, width: int) -> torch.Tensor:
        """(R, 1, n, width): query (r, q) sees the columns up to its own, columns[r, q]."""
        keys = torch.arange(width, device=self.device)
        visible = keys[None, None, None, :] <= columns[:, None, :, None]
        if not self._additive:
            return visible
        dtype = self.model.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill(
            ~visible, torch.finfo(dtype).min
        )

    def prefill(
        self, cache: SlotCache, chunks: list[list[int]], offsets: list[int]
    ) -> torch.Tensor:
        """Rows 0..R-1 of `cache` take their next prompt chunk: row r's `chunks[r]`,
        after its first `offsets[r]` tokens. Returns (R, V): each row's logits at the
        last token of its chunk."""
        rows, width_in = len(chunks), max(len(chunk) for chunk in chunks)
        padded = [chunk + [self.pad_id] * (width_in - len(chunk)) for chunk in chunks]
        tokens = torch.tensor(padded, device=self.device)  # (R, n)
        start = torch.tensor(offsets, device=self.device).unsqueeze(1)  # (R, 1)
        columns = start + torch.arange(width_in, device=self.device)  # (R, n)
        width = max(offsets) + width_in
        cache.reserve(rows, width)
        last = torch.tensor([len(chunk) - 1 for chunk in chunks], device=self.device)
        with prefilling():
            return self._forward(
                cache,
                tokens,
                columns.clamp(max=self.context_length - 1),  # pads may run past the window
                columns,
                self._mask(columns, width),
                last.unsqueeze(1),  # (R, 1): per-row position of the logits to keep
            )

    def replay(self, cache: SlotCache, tokens: list[int], offset: int, chunk: int) -> torch.Tensor:
        """Row 0 of a one-row `cache` takes `tokens` after its first `offset`, with the
        numbers decode steps gave them (where the compact pass runs): a job taken
        over resumes from the tokens another worker published, and its next token
        must be the one that worker would have chosen. A prefill computes them
        otherwise: a bfloat16 copy of quantized weights instead of the int8/int4
        kernel, and every query of a chunk in one attention call; in bfloat16 that
        moves logits enough to flip a near-tie, so a greedy stream taken over would
        diverge from the text it was reading. Elsewhere (transformers' forward) this
        is a prefill, which in float32 differs from decode steps only by float32
        rounding. Returns (1, V): the logits after the last token."""
        for start in range(0, len(tokens), chunk):  # chunks bound the activations only
            piece = tokens[start : start + chunk]
            if self._compact is None:
                logits = self.prefill(cache, [piece], [offset + start])
                continue
            columns = offset + start + torch.arange(len(piece), device=self.device)[None, :]
            width = offset + start + len(piece)
            cache.reserve(1, width)
            ids = torch.tensor([piece], device=self.device)  # (1, n)
            mask = self._mask(columns, width)
            logits = self._compact(cache, ids, columns, columns, mask, 1, stepwise=True)
        return logits

    def decode(self, cache: SlotCache, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """Rows 0..R-1 of `cache` take one token each: row r's `tokens[r]` at position
        `lengths[r]` (the tokens it holds). Returns (R, V)."""
        rows, width = len(tokens), max(lengths) + 1
        cache.reserve(rows, width)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)  # (R, 1)
        columns = torch.tensor(lengths, device=self.device).unsqueeze(1)  # (R, 1)
        return self._decode(cache, ids, columns, columns, self._mask(columns, width), 1)

    # -- compiling the decode pass ----------------------------------------------------

    def compile_decode(self, background: bool) -> None:
        """Compile the decode pass with torch.compile; until it is ready (and if it
        fails) the eager pass serves. `background`: compile in a thread of its own."""
        if background:
            threading.Thread(target=self._compile, name="compile-decode", daemon=True).start()
        else:
            self._compile()

    def _compile(self) -> None:
        self.decode_mode = "compiling"
        started = time.perf_counter()
        compiled = torch.compile(self._forward, dynamic=True)
        try:
            with torch.inference_mode():
                # Both shapes a batch has: one row (sizes of 1 are specialized) and several.
                for rows in (1, 2):
                    cache = self.new_cache(rows, 64)
                    ids = torch.full((rows, 1), self.pad_id, device=self.device)
                    for length in (3, 5):
                        columns = torch.full((rows, 1), length, device=self.device)
                        mask = self._mask(columns, length + 1)
                        compiled(cache, ids, columns, columns, mask, 1)
        except Exception as exc:  # no C++ compiler, an unsupported op: stay eager
            self.decode_mode = "failed"
            log.warning("compiling the decode step failed; staying eager: %s", exc)
            return
        # A shape the warm-up did not cover runs eagerly rather than stalling the
        # batch for a new compile.
        torch.compiler.set_stance("eager_on_recompile")
        self._decode, self.decode_mode = compiled, "compiled"
        log.info("decode step compiled in %.1fs", time.perf_counter() - started)
