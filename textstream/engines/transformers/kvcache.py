"""The KV cache of a batch: one preallocated row ("slot") per sequence, written in place.

Per layer, keys and values are (rows, kv_heads, columns, head_dim) tensors,
allocated once and grown by doubling when a batch outgrows them, never
concatenated per step. Sequence r keeps its token at position p in column p of
row r, so the rows of a batch need no alignment: each forward pass writes each
row's new tokens at that row's own columns, and attends to the first `width`
columns of the rows it runs, masked per row (`attention_mask`). The forward
passes of a batch run on a contiguous block of rows: the decoding sequences are
rows 0..D-1, sequences still in prefill follow them (batching.py keeps that
order by moving rows, which copies one row, only when a sequence joins or leaves).

Columns a row does not use hold stale values of an earlier sequence. They are
masked, but a masked NaN still poisons attention (NaN + -inf is NaN), so a row
is zeroed past its prompt when a sequence takes it (`clear`).

transformers' model code sees a `Cache`: it calls `update(keys, values, layer)`
once per layer and attends to what it returns; `plan()` tells the cache, before
each forward pass, which rows and columns that pass writes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _Plan:
    """Where the next forward pass writes: rows 0..R-1 of the cache, and for each of
    them the columns `columns` (R, n); it attends to the first mask.shape[-1]
    columns of those rows."""

    columns: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor  # (R, 1): 0..R-1, broadcast against `columns`


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values, (rows, heads, columns, head_dim)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, columns = self._owner.rows, self._owner.columns
        _, heads, _, k_dim = key_states.shape
        v_dim = value_states.shape[-1]
        like = {"dtype": key_states.dtype, "device": key_states.device}
        self.keys = torch.zeros((rows, heads, columns, k_dim), **like)  # type: ignore[arg-type]
        self.values = torch.zeros((rows, heads, columns, v_dim), **like)  # type: ignore[arg-type]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states, value_states: (R, heads, n, head_dim), the pass's new tokens.
        Returns the R rows' first `width` columns, new tokens included."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        plan = self._owner.plan
        # In place, into the whole tensor (a compiled step then writes just these
        # entries). Advanced indices around a slice put their dimensions first:
        # the values go in as (R, n, heads, dim).
        self.keys[plan.rows, :, plan.columns] = key_states.transpose(1, 2)
        self.values[plan.rows, :, plan.columns] = value_states.transpose(1, 2)
        count, width = key_states.shape[0], plan.mask.shape[-1]
        return self.keys[:count, :, :width], self.values[:count, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.plan.mask.shape[-1], 0

    def get_seq_length(self) -> int:
        return 0  # positions are always passed explicitly (position_ids)

    def get_max_length(self) -> int:
        return self._owner.columns

    def grow(self, rows: int, columns: int) -> None:
        if self.keys is None or self.values is None:
            return  # allocated at the first update, at the owner's new size
        self.keys = _grown(self.keys, rows, columns)
        self.values = _grown(self.values, rows, columns)


class SlotCache(Cache):
    """A batch's KV cache: `rows` sequences of up to `columns` tokens, grown on demand."""

    def __init__(self, num_layers: int, rows: int = 1, columns: int = 256) -> None:
        self.rows, self.columns = rows, columns
        self.plan = _Plan()
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[no-any-return]

    def reserve(self, rows: int, columns: int) -> None:
        """Make room for `rows` rows of `columns` columns (doubling, to grow rarely)."""
        if rows <= self.rows and columns <= self.columns:
            return
        while self.rows < rows:
            self.rows *= 2
        while self.columns < columns:
            self.columns *= 2
        for layer in self.slot_layers:
            layer.grow(self.rows, self.columns)

    def set_plan(self, columns: torch.Tensor, mask: torch.Tensor) -> None:
        """The next forward pass writes rows 0..R-1 at `columns` (R, n) and attends
        through `mask` (R, 1, n, width)."""
        plan = self.plan
        plan.columns, plan.mask = columns, mask
        plan.rows = torch.arange(columns.shape[0], device=columns.device).unsqueeze(1)

    def move(self, source: int, target: int) -> None:
        """Copy row `source` over row `target` (whole rows: no stale column survives)."""
        for layer in self.slot_layers:
            if layer.keys is not None and layer.values is not None:
                layer.keys[target] = layer.keys[source]
                layer.values[target] = layer.values[source]

    def take(self, other: SlotCache, source: int, target: int, width: int) -> None:
        """Copy row `source` of `other` (its first `width` columns) into row `target`,
        zeroing the rest of that row."""
        self.reserve(target + 1, width)
        for mine, theirs in zip(self.slot_layers, other.slot_layers, strict=True):
            if theirs.keys is None or theirs.values is None:
                continue
            if mine.keys is None or mine.values is None:
                mine.lazy_initialization(theirs.keys[:, :, :0], theirs.values[:, :, :0])
            assert mine.keys is not None and mine.values is not None
            mine.keys[target, :, :width] = theirs.keys[source, :, :width]
            mine.values[target, :, :width] = theirs.values[source, :, :width]
        self.clear(target, width)

    def clear(self, row: int, start: int = 0) -> None:
        """Zero row `row` from column `start` on (stale values of an earlier sequence)."""
        for layer in self.slot_layers:
            if layer.keys is not None and layer.values is not None:
                layer.keys[row, :, start:].zero_()
                layer.values[row, :, start:].zero_()


def _grown(tensor: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    old_rows, heads, old_columns, dim = tensor.shape
    grown = tensor.new_zeros((rows, heads, columns, dim))
    grown[:old_rows, :, :old_columns] = tensor
    return grown
