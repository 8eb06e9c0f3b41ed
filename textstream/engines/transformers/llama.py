"""A compact forward pass for Llama-shaped models (Llama, SmolLM, Mistral, Qwen2), on a
SlotCache: the same arithmetic as transformers' model code with a fraction of its
per-layer Python.

On a small CPU, decoding one token of a small model is dominated by overhead, not
arithmetic: transformers' LlamaForCausalLM runs ~70 tensor operations and as many
Python calls per layer (module hooks, kwargs plumbing, the Cache interface, mask
handling), ~20 ms of SmolLM2-135M's ~38 ms decode step on 2 cores (py-spy,
torch.profiler). This pass runs the same layers in ~20 operations each:

- q, k and v are one matrix product, gate and up another (their weights joined
  once, the original modules re-pointed at row slices of the joined weight, so
  nothing is held twice and transformers' own forward still works);
- the rotary embedding turns q and k in one go (they are adjacent in the joined
  output), with transformers' own `rotary_emb` for the angles, so every rope
  scaling type it knows is honoured;
- keys and values go straight into the slot cache's tensors (kvcache.py), and a
  one-token query attends through grouped heads without repeating the keys (as
  transformers does for a single query).

Numerics are transformers' (same dtypes, same order of operations per element,
RMSNorm in float32): tests/test_llama_pass.py checks logits and greedy tokens
against transformers' forward. Models this does not recognise exactly keep
transformers' forward (`compact_pass` returns None).
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from textstream.engines.transformers.kvcache import SlotCache
from textstream.engines.transformers.quantize import Int4Linear, Int8Linear

log = logging.getLogger(__name__)

Q = TypeVar("Q", Int8Linear, Int4Linear)

#: transformers model types whose decoder layers this pass reproduces exactly.
MODEL_TYPES = ("llama", "mistral", "qwen2")


class _Joined(nn.Module):
    """Several linear layers with the same input, as one (outputs side by side)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.sizes = [_out_features(layer) for layer in layers]
        kind = _kind(layers)
        #: Whether these are int8/int4 kernels (row-invariant products).
        self.quantized = kind in (Int8Linear, Int4Linear)
        if kind is Int4Linear and all(size % INT4_BLOCK == 0 for size in self.sizes):
            self.inner: nn.Module = _join_int4(layers)  # type: ignore[arg-type]
        elif kind is Int4Linear:  # packed blocks would straddle two layers: side by side
            self.inner = _SideBySide(layers)
        elif kind is Int8Linear:
            self.inner = _join_int8(layers)  # type: ignore[arg-type]
        else:
            self.inner = _join_linear(layers)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)  # type: ignore[no-any-return]


#: torch packs int4 weights in blocks of this many output channels: packed layers
#: concatenate into the packing of the concatenation only in whole blocks.
INT4_BLOCK = 64


class _SideBySide(nn.Module):
    """Layers that cannot be joined, called one after another, outputs concatenated."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


def _kind(layers: list[nn.Module]) -> type | None:
    """The one class of `layers` (Linear, Int8Linear, Int4Linear); None if mixed."""
    kinds = {type(layer) for layer in layers}
    return kinds.pop() if len(kinds) == 1 else None


def _out_features(layer: nn.Module) -> int:
    return int(layer.out_features)  # type: ignore[arg-type]


def _join_linear(layers: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([layer.weight.detach() for layer in layers])
    biases = [layer.bias for layer in layers]
    # On the meta device: no throwaway initialisation of the joined weight.
    joined = nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
    joined.weight = nn.Parameter(weight, requires_grad=False)
    if joined.bias is not None:
        joined.bias = nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)  # type: ignore[union-attr]
    start = 0
    for layer in layers:  # re-point each at its rows of the joined weight: no copy kept
        end = start + layer.out_features
        layer.weight = nn.Parameter(joined.weight[start:end], requires_grad=False)
        if joined.bias is not None:
            layer.bias = nn.Parameter(joined.bias[start:end], requires_grad=False)
        start = end
    return joined


def _join_int8(layers: list[Int8Linear]) -> Int8Linear:
    joined: Int8Linear = _join_buffers(Int8Linear, layers, {"qweight": 0, "scale": 0, "bias": 0})
    joined._wide = None  # made from the joined rows at the next prefill
    for layer in layers:
        layer._wide = None
    return joined


def _join_int4(layers: list[Int4Linear]) -> Int4Linear:
    # scale_zero is (groups, out, 2): its output channels are dimension 1.
    parts = {"packed": 0, "scale_zero": 1, "wide": 0, "bias": 0}
    return _join_buffers(Int4Linear, layers, parts)


def _join_buffers(cls: type[Q], layers: list[Q], parts: dict[str, int]) -> Q:
    """A `cls` layer whose buffers `parts` (name: dimension of the output channels)
    are the layers' concatenated; each layer's buffers become views of its channels
    (copies where a view would not be contiguous: small per-channel tensors)."""
    joined = cls.__new__(cls)
    nn.Module.__init__(joined)
    for name, dim in parts.items():
        values = [getattr(layer, name) for layer in layers]
        joined.register_buffer(name, None if values[0] is None else torch.cat(values, dim=dim))
    sizes = [_out_features(layer) for layer in layers]
    joined.out_features, joined.in_features = sum(sizes), layers[0].in_features
    start = 0
    for layer, size in zip(layers, sizes, strict=True):
        for name, dim in parts.items():
            whole = getattr(joined, name)
            if whole is not None:
                part = whole.narrow(dim, start, size)
                setattr(layer, name, part if part.is_contiguous() else part.contiguous())
        start += size
    return joined


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' LlamaRMSNorm (`norm`: its weight and epsilon): normalised in
    float32, then scaled in the input's dtype; the float32 part as one fused
    operation instead of six (the same numbers up to float rounding; SmolLM2's
    logits come out identical: tests/test_llama_pass.py)."""
    weight, eps = norm
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.to(torch.float32), weight.shape, None, eps).to(x.dtype)


def _norm(module: nn.Module) -> tuple[torch.Tensor, float]:
    return module.weight, float(module.variance_epsilon)  # type: ignore[arg-type]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb on x (..., d): x * cos + rotate_half(x) *
    sin, where rotate_half(x) = (-x2, x1). `sin` comes with its first half negated
    (`_signed`), so rotate_half(x) * sin is x rolled by half times it: the same
    products (a sign moved from one factor to the other is exact) in 4 operations
    instead of 7."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _signed(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class _Layer:
    """One decoder layer's parts, joined."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = _norm(layer.input_layernorm)
        self.post_norm = _norm(layer.post_attention_layernorm)
        self.qkv = _Joined([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up = _Joined([mlp.gate_proj, mlp.up_proj])
        self.intermediate = self.gate_up.sizes[0]
        self.scaling = float(attn.scaling)
        # Bound `forward`s, called directly: nn.Module.__call__'s hook handling is
        # ~5 µs a call, 150 calls a token for SmolLM2 (no hooks are set on these).
        self.qkv_fn = self.qkv.inner.forward
        self.o_fn = attn.o_proj.forward
        self.gate_up_fn = self.gate_up.inner.forward
        self.down_fn = mlp.down_proj.forward
        self.act_fn = mlp.act_fn.forward


class LlamaPass:
    """`forward(cache, tokens, positions, columns, mask, keep)`: transformers'
    LlamaForCausalLM forward on a SlotCache, compact. Same contract as
    passes._forward."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.embed = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.norm = _norm(model.model.norm)
        self.head = model.lm_head
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.layers = [_Layer(layer) for layer in model.model.layers]
        #: BATCH_INVARIANT: in bfloat16, or with quantized layers, on CPU, rows
        #: attend one by one (_row_spans).
        self.batch_invariant = False
        #: Whether the layers are int8/int4 kernels: their rows come out the same
        #: whatever the row count, so a batch can be made exact (_row_spans).
        self.quantized = any(layer.qkv.quantized for layer in self.layers)

    def __call__(
        self,
        cache: SlotCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        columns: torch.Tensor,
        mask: torch.Tensor,
        keep: int | torch.Tensor,
        stepwise: bool = False,
    ) -> torch.Tensor:
        """tokens, positions, columns: (R, n); mask (R, 1, n, width) boolean or
        additive; keep: 1 (the last token) or (R, 1) per-row indices. Returns (R, V).

        `stepwise` (one row, `Passes.replay`): the n tokens get the numbers n decode
        steps would give them: each query attends alone, over the columns up to its
        own, as a one-token step does (the matrix products are the same row by row
        whatever the row count: tests/test_llama_pass.py)."""
        cache.set_plan(columns, mask)
        rows_count, n = tokens.shape
        width = mask.shape[-1]
        x = self.embed(tokens)  # (R, n, H)
        # BATCH_INVARIANT, in bfloat16 or quantized on CPU: rows attend one by one
        # over their own columns.
        spans = (
            _row_spans(columns, keep, mask, x.dtype, self.quantized)
            if self.batch_invariant and rows_count > 1
            else None
        )
        first = int(columns[0, 0]) if stepwise else 0
        attn_mask: torch.Tensor | None = mask
        if stepwise or (n == 1 and (spans is not None or _unmasked(mask))):
            # Every row sees every column it is given (one request, or all at one
            # length, or row by row): the unmasked kernel, nothing added to the scores.
            attn_mask = None
        elif mask.dtype == torch.bool:  # once here, not once per layer inside attention
            attn_mask = torch.zeros(mask.shape, dtype=x.dtype, device=mask.device).masked_fill(
                ~mask, -torch.inf
            )
        # Each row's (query count, columns, mask) as it would run alone.
        row_masks = [
            (
                count,
                columns_seen,
                None
                if count == 1 or attn_mask is None
                else attn_mask[r : r + 1, :, :count, :columns_seen].contiguous(),
            )
            for r, (count, columns_seen) in enumerate(spans or [])
        ]
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.rotary(x, positions)  # (R, n, d)
        cos, sin = cos.unsqueeze(2), _signed(sin).unsqueeze(2)  # against (R, n, heads, d)
        cells: torch.Tensor | None = None  # cache cells this pass writes (same every layer)
        for index, layer in enumerate(self.layers):
            slot = cache.slot_layers[index]
            h = _rms_norm(x, layer.input_norm)
            qkv = layer.qkv_fn(h).view(rows_count, n, heads + 2 * kv_heads, dim)
            qk = _rotate(qkv[:, :, : heads + kv_heads], cos, sin)
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]
            if not slot.is_initialized:
                slot.lazy_initialization(k.transpose(1, 2), v.transpose(1, 2))
            assert slot.keys is not None and slot.values is not None
            if cells is None:
                cells = _cell_index(slot.keys.shape, columns)
            # (R, n, kv_heads, d) into each row's columns, one cell per (row, token, head)
            slot.keys.view(-1, dim).index_copy_(0, cells, k.reshape(-1, dim))
            slot.values.view(-1, dim).index_copy_(0, cells, v.reshape(-1, dim))
            if stepwise:  # query t alone over columns ..first + t, as its decode step
                out = torch.cat(
                    [
                        self._attend(
                            q[:, t : t + 1],
                            slot.keys[:1],
                            slot.values[:1],
                            None,
                            first + t + 1,
                            layer.scaling,
                        )
                        for t in range(n)
                    ],
                    dim=1,
                )
            elif not row_masks:
                out = self._attend(
                    q,
                    slot.keys[:rows_count],
                    slot.values[:rows_count],
                    attn_mask,
                    width,
                    layer.scaling,
                )
            else:  # each row alone, over its own columns (see _row_spans)
                out = torch.cat(
                    [
                        F.pad(
                            self._attend(
                                q[r : r + 1, :count],
                                slot.keys[r : r + 1],
                                slot.values[r : r + 1],
                                row_mask,
                                columns_seen,
                                layer.scaling,
                            ),
                            (0, 0, 0, n - count),  # a short row's pad queries: zeros
                        )
                        for r, (count, columns_seen, row_mask) in enumerate(row_masks)
                    ]
                )
            x = x + layer.o_fn(out)
            h = _rms_norm(x, layer.post_norm)
            gate_up = layer.gate_up_fn(h)
            gate, up = gate_up[..., : layer.intermediate], gate_up[..., layer.intermediate :]
            x = x + layer.down_fn(layer.act_fn(gate) * up)
        if isinstance(keep, int):
            last = x[:, -keep:]
        else:
            last = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.head(_rms_norm(last, self.norm))[:, -1, :]  # type: ignore[no-any-return]

    def _attend(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None,
        width: int,
        scale: float,
    ) -> torch.Tensor:
        """q (R, n, heads, d) against the first `width` columns of the cache rows
        keys/values (R, kv_heads, columns, d); returns (R, n, heads * d)."""
        rows_count, n, heads, dim = q.shape
        group = heads // self.kv_heads
        keys, values = keys[:, :, :width], values[:, :, :width]
        if n == 1 and group > 1:
            # One query: its heads, grouped by key head, are the "sequence".
            query = q.reshape(rows_count, self.kv_heads, group, dim)
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=attn_mask, scale=scale
            )  # (R, kv_heads, group, d)
            return out.reshape(rows_count, 1, heads * dim)
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=attn_mask, scale=scale
        )  # (R, heads, n, d)
        return out.transpose(1, 2).reshape(rows_count, n, heads * dim)


def _unmasked(mask: torch.Tensor) -> bool:
    """Whether a boolean mask lets every query see every column, on CPU only: there
    SDPA computes the same with or without the mask, so a request alone and in a
    batch get the same numbers. On a GPU the masked and unmasked kernels differ
    (and the check would wait for the device); a compiled pass must not branch on
    data."""
    return (
        mask.dtype == torch.bool
        and mask.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and bool(mask.all())
    )


def _row_spans(
    columns: torch.Tensor,
    keep: int | torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype,
    quantized: bool,
) -> list[tuple[int, int]] | None:
    """With BATCH_INVARIANT, for a pass of bfloat16/float16 rows, or of a model with
    quantized layers, on CPU: each row's
    (query count, columns it attends to), its own chunk's as if it ran alone, so
    that each row's attention runs as it does alone (else None: one attention call
    for the batch).

    The CPU attention kernel's summation order depends on the number of columns it
    is given: over a batch's width (its longest row's), a shorter row's sums round
    differently from the same row alone, in bfloat16 visibly (a logit moved by up
    to 0.06 on a tiny model, enough to flip a near-tie), so a greedy request may
    pick other tokens in a batch than alone. Attending row by row over each row's
    own columns gives its numbers alone exactly (the matrix products are already
    row-independent), at a price: one attention call per row and layer, 10-25 %
    of an 8-row SmolLM2 int4 step on 2 cores (BENCHMARKS.md), hence opt-in, as vLLM's
    batch-invariant mode is. In float32 the difference stays at float32 rounding,
    unless the layers are int8/int4 kernels: they take bfloat16 rows, and a float32
    difference that moves one rounding to bfloat16 grows layer by layer (0.25 on
    SmolLM2's logits). On a GPU the per-row sizes would wait for the device; a
    compiled pass must not branch on data."""
    if (
        (dtype == torch.float32 and not quantized)
        or mask.device.type != "cpu"
        or mask.dtype != torch.bool
        or torch.compiler.is_compiling()
    ):
        return None
    rows_count, n = columns.shape
    # Prefill: keep holds each row's last real token (rows are padded to the
    # longest chunk); decode: every row has its one token.
    counts = [n] * rows_count if isinstance(keep, int) else [k + 1 for k in keep[:, 0].tolist()]
    starts = columns[:, 0].tolist()
    return [(count, int(start) + count) for count, start in zip(counts, starts, strict=True)]


def _cell_index(shape: torch.Size, columns: torch.Tensor) -> torch.Tensor:
    """Rows of a (rows * heads * columns, d) view of a cache tensor of `shape` that
    the pass's tokens fill: row r, token t, head h -> cell (r, h, columns[r, t]),
    in the order of a (R, n, heads, d) tensor."""
    _, heads, width, _ = shape
    row = torch.arange(columns.shape[0], device=columns.device)[:, None, None]
    head = torch.arange(heads, device=columns.device)[None, None, :]
    return ((row * heads + head) * width + columns[:, :, None]).reshape(-1)


#: The linear layers the pass can join and call (a checkpoint loaded already
#: quantized, e.g. bitsandbytes or GPTQ, keeps transformers' forward).
LINEARS = (nn.Linear, Int8Linear, Int4Linear)


def compact_pass(model: Any) -> LlamaPass | None:
    """A LlamaPass for `model` where it reproduces transformers' forward exactly, else
    None (keep transformers' forward)."""
    config = model.config
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return None
    # Sliding-window attention (Mistral's config.sliding_window, Qwen2's sliding
    # layers): the pass attends to every column (supports_slots refuses them too).
    if getattr(config, "sliding_window", None) and config.model_type == "mistral":
        return None
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return None
    try:
        layers = list(model.model.layers)
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            if type(layer.input_layernorm).__name__.endswith("RMSNorm") is False:
                return None
            if getattr(mlp, "act_fn", None) is None or getattr(attn, "sliding_window", None):
                return None
            # Qwen3-style q/k norms, or anything else on the attention module, would be skipped.
            if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
                return None
            joined = ([attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj])
            linears = [*joined[0], attn.o_proj, *joined[1], mlp.down_proj]
            if not all(type(linear) in LINEARS for linear in linears):
                return None
            # Layers joined into one product must be alike (QUANTIZE=int4 leaves a
            # layer the kernel refuses in int8).
            if any(_kind(group) is None for group in joined):
                log.info("layers of mixed kinds: transformers' forward for %s", config.model_type)
                return None
        compact = LlamaPass(model)
    except (AttributeError, RuntimeError, TypeError) as exc:
        log.warning("no compact pass for %s (%s): transformers' forward", config.model_type, exc)
        return None
    log.info("compact decoder pass for %s (%d layers)", config.model_type, len(layers))
    return compact
