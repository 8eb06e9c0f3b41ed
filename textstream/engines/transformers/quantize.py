"""QUANTIZE=int8 / int4: weight-only int8 or int4 for the linear layers, on CPU.

Decoding one token reads every weight once; on a small CPU that memory traffic is
the cost (float32 SmolLM2-135M: 540 MB per token). bfloat16 would halve it, but
on CPUs where the OS gives torch no AMX tiles (this VM), its one-row matrix
products run no faster than float32 ones. torch's int8 weight-only kernel
(`_weight_int8pack_mm`: int8 weights, one float scale per output channel,
bfloat16 activations) reads a quarter of the bytes and runs ~2x faster per
layer here (BENCHMARKS.md). Only these layers compute in bfloat16: each casts its
rows on the way in and its output back (_kernel_rows), and the model around them
keeps its dtype (float32 on CPU).

Decode passes go through that kernel, however many rows they have, so a request
computes the same alone or in a batch: the kernel gives a row the same numbers
whatever the row count. Prefill passes (passes.py runs them inside
`prefilling()`) go through the kernel as well, except on CPUs that multiply
bfloat16 matrices natively (AVX-512 BF16, AMX: `bf16_prefill`): there a
bfloat16 matrix product on the same int8 values (exact in bfloat16, a bfloat16
copy made at the first prefill), scaled after, is faster for many rows. Without
those instructions (AVX2 hosts) torch emulates bfloat16 products, and the
kernels prefill 2-3.5x faster than that copy at 8 to 256 rows (BENCHMARKS.md),
and hold no copy.

QUANTIZE=int4 halves the bytes again with torch's int4 kernel
(`_weight_int4pack_mm_for_cpu`): 4-bit values in groups of 32 along the input,
each group with its own scale and offset: the layout of llama.cpp's Q4_1, the
bundled GGUF's, so a Q4_1 model loses little more than it already lost. It makes
a decode step's matrix products about 2x faster than int8's here, the difference
that brings the built-in engine near llama.cpp (BENCHMARKS.md). A layer the
kernel cannot take (an input size not a multiple of 32, an output size it cannot
pack, e.g. GPT-2's 50,257-token head) stays int8.

Greedy output is not float32's: int8 rounding moves logits by a little (int4 by
more), and where two tokens are nearly tied the choice can change. Hence the
default, QUANTIZE=auto: a GGUF file's model keeps the file's own quantization
(gguf_types.py: its Q4 layers int4, its Q8 ones int8), which is the model the file
holds, and a float checkpoint stays float (BENCHMARKS.md has the comparison).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_local = threading.local()


@contextmanager
def prefilling() -> Iterator[None]:
    """Int8Linear layers called in this block (this thread) use the matrix product."""
    _local.prefill = True
    try:
        yield
    finally:
        _local.prefill = False


def _in_prefill() -> bool:
    # Only the decode pass is compiled: traced code never prefills.
    return (
        not torch.compiler.is_compiling() and getattr(_local, "prefill", False) and bf16_prefill()
    )


@functools.cache
def bf16_prefill() -> bool:
    """Whether prefill multiplies by a bfloat16 copy of the weights rather than
    through the int8/int4 kernels: on CPUs with native bfloat16 matrix products
    (AVX-512 BF16 or AMX), where that is the faster way for many rows. Decided
    by the CPU's flags, not by timing, so that every worker of a host prefills
    alike (a job taken over must find the numbers its first worker had)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: the kernels, which are right everywhere
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def _kernel_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The rows as the kernels take them: bfloat16. The model around the layers
    stays in its own dtype (float32 on CPU): the residual stream, norms, rotary
    embeddings, attention and the KV cache, as llama.cpp keeps them. With them in
    bfloat16 as well (the model cast whole), a residual of 10 is held to steps of
    0.06 and a prompt's attention in one call rounds otherwise than a decode
    step's: SmolLM2's logits moved by up to 0.94 between the two, and the first
    answer token to the README's question flipped. With float32 activations they
    move by up to 0.25 (a float32 difference that changes one rounding to
    bfloat16 at a kernel's input grows layer by layer: takeovers still replay,
    Passes.replay) and pick the float32 model's token, at no measurable cost
    (bench/activations.py). The kernels take float32 rows too, but run 9x slower
    on them than on bfloat16 ones, hence the cast."""
    return rows if rows.dtype == dtype else rows.to(dtype)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q (out, in) int8 and scale (out,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        """weight: (out, in) float."""
        super().__init__()
        weight = weight.detach().float().contiguous()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("qweight", (weight / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.out_features, self.in_features = weight.shape
        self._wide: torch.Tensor | None = None  # qweight in bfloat16, for prefill

    #: The output head sets this: how many of a row's highest outputs (logits) are
    #: computed again in float32 (`_refined`).
    refine = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        given = x.reshape(-1, self.in_features)  # (M, in), float32 (see _kernel_rows)
        rows = _kernel_rows(given, self.scale.dtype)
        if _in_prefill():
            if self._wide is None:
                self._wide = self.qweight.to(rows.dtype)
            out = nn.functional.linear(rows, self._wide) * self.scale
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        if self.refine:
            out = self._refined(given, out)
        return out.view(*x.shape[:-1], self.out_features)

    def _refined(self, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Logits (M, V) in float32, each row's `refine` highest computed again in
        float32 from their int8 weights. The kernel returns bfloat16, whose steps
        near a logit of 25 are 0.125 apart: SmolLM2's first answer token to "What
        is the capital of France?" is 0.08 ahead of the next in float32 and came
        out tied with it (argmax then takes the lower id, and the answer went
        elsewhere). A float32 head would cost 5x the bfloat16 kernel's time here;
        recomputing a handful of rows costs nothing, and greedy choices and the
        top of the distribution are then a float32 head's. Per row, so a row gets
        the same numbers alone, in a batch, or replayed."""
        out = out.float()
        top = out.topk(min(self.refine, out.shape[-1]), dim=-1).indices  # (M, k)
        weights = self.qweight[top].float()  # (M, k, in)
        # A product and a sum over each (row, token) alone (a batched matrix
        # product's sums may be ordered by the row count).
        exact = (weights * rows.float()[:, None, :]).sum(-1) * self.scale[top].float()
        if self.bias is not None:
            exact = exact + self.bias[top].float()
        return out.scatter(-1, top, exact)


class Int4Linear(nn.Module):
    """y = x @ W^T + bias, W in groups of GROUP inputs: W = (q - 8) * scale + zero,
    q in 0..15 (packed by torch for its CPU kernel), scale and zero per (group,
    output) in bfloat16."""

    GROUP = 32

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        """weight: (out, in) float, `in` a multiple of GROUP. Raises RuntimeError
        where torch's packing refuses the shape."""
        super().__init__()
        out_features, in_features = weight.shape
        groups = (
            weight.detach().float().reshape(out_features, in_features // self.GROUP, self.GROUP)
        )
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, in / GROUP)
        # The kernel's scale and zero are bfloat16: round them first, then choose q
        # against the rounded values, so q * scale + zero is the nearest it can do.
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny)
        scale = scale.to(torch.bfloat16).float()
        zero = (low + 8 * scale).to(torch.bfloat16).float()
        q = ((groups - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
        self.register_buffer(
            "packed",
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32).reshape(out_features, in_features), 2
            ),
        )
        # (in / GROUP, out, 2): the kernel's layout.
        self.register_buffer(
            "scale_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1).to(dtype).contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.out_features, self.in_features = out_features, in_features
        # Where prefill takes a bfloat16 copy (bf16_prefill, see the module's
        # docstring): the kernel's values rounded to bfloat16 (q * scale + zero is
        # not exact in it, unlike int8's integers), so a prompt's tokens see
        # weights a rounding away from a decode step's: the same for a request
        # alone or in a batch. Made here, while q is at hand (the packed form is
        # torch's own); it holds 2 bytes a weight, as int8's copy does.
        wide = None
        if bf16_prefill():
            wide = ((q - 8) * scale[..., None] + zero[..., None]).reshape(out_features, -1)
        self.register_buffer("wide", None if wide is None else wide.to(dtype), persistent=False)

    def dequantized(self) -> torch.Tensor:
        """The weights (out, in) as the kernel multiplies by them, rounded to
        bfloat16: the kernel's product with the identity."""
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.packed, self.GROUP, self.scale_zero
        ).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _kernel_rows(x.reshape(-1, self.in_features), self.scale_zero.dtype)  # (M, in)
        if self.wide is not None and _in_prefill():
            out = nn.functional.linear(rows, self.wide)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.GROUP, self.scale_zero
            )
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def _int4(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Module:
    """Int4Linear where the kernel takes the shape, else Int8Linear."""
    if weight.shape[1] % Int4Linear.GROUP == 0:
        try:
            return Int4Linear(weight, bias, dtype)
        except RuntimeError as exc:  # a shape torch's packing refuses
            log.debug("int4 refused a %s layer (%s); int8 instead", tuple(weight.shape), exc)
    return Int8Linear(weight, bias, dtype)


KERNELS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}

#: An int8 output head's highest logits per row recomputed in float32 (Int8Linear._refined).
REFINED_LOGITS = 16


def quantize_linears(
    model: Any, device: torch.device, bits: str = "int8", plan: dict[str, str | None] | None = None
) -> bool:
    """Swap the model's linear layers (GPT-2's Conv1D too, and the output head) for
    Int8Linear, or with bits="int4" Int4Linear where the shape allows, in place.
    With `plan` ({module name: 'int4' | 'int8' | None}, gguf_types.plan) each
    layer gets its own, and one the plan leaves out or sets to None stays float.
    False, with the model untouched, off CPU or where the kernels are missing."""
    wanted = {bits} if plan is None else {b for b in plan.values() if b}
    kernels = {"_weight_int8pack_mm"} | {KERNELS[b] for b in wanted}
    if device.type != "cpu" or not all(hasattr(torch.ops.aten, k) for k in kernels):
        log.warning("QUANTIZE=%s is for CPU with torch's kernel; keeping %s", bits, model.dtype)
        return False
    from transformers.pytorch_utils import Conv1D

    dtype = torch.bfloat16  # the kernels' scales, and the rows they take (_kernel_rows)
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                weight = child.weight  # (out, in)
            elif isinstance(child, Conv1D):
                weight = child.weight.t()  # Conv1D keeps (in, out)
            else:
                continue
            want = bits if plan is None else plan.get(f"{parent_name}.{name}".lstrip("."))
            if want is None:
                continue
            make = _int4 if want == "int4" else Int8Linear
            setattr(parent, name, make(weight, child.bias, dtype))
            swapped += 1
    head = model.get_output_embeddings()
    if isinstance(head, Int8Linear):
        head.refine = REFINED_LOGITS
    int4 = sum(isinstance(m, Int4Linear) for m in model.modules())
    log.info(
        "QUANTIZE=%s: %d linear layers quantized (%d int4, %d int8; %s activations)",
        bits,
        swapped,
        int4,
        swapped - int4,
        str(model.dtype).removeprefix("torch."),
    )
    return True
