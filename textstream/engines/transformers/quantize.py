"""QUANTIZE=int8: weight-only int8 for the linear layers, on CPU.

Decoding one token reads every weight once; on a small CPU that memory traffic is
the cost (float32 SmolLM2-135M: 540 MB per token). bfloat16 would halve it, but
on CPUs where the OS gives torch no AMX tiles (this VM), its one-row matrix
products run no faster than float32 ones. torch's int8 weight-only kernel
(`_weight_int8pack_mm`: int8 weights, one float scale per output channel,
bfloat16 activations) reads a quarter of the bytes and runs ~2x faster per
layer here (BENCHMARKS.md), so the model runs in bfloat16 with these layers.

Decode passes go through that kernel, however many rows they have, so a request
computes the same alone or in a batch. Prefill passes (passes.py runs them
inside `prefilling()`) go through a bfloat16 matrix product on the same int8
values (exact in bfloat16, kept as a bfloat16 copy made at the first prefill),
scaled after: the kernel's cost grows with every row (token), a matrix
product's barely does.

Greedy output is not float32's: int8 rounding moves logits by a little, and
where two tokens are nearly tied the choice can change. Hence a setting, off by
default (BENCHMARKS.md has the comparison).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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
    return not torch.compiler.is_compiling() and getattr(_local, "prefill", False)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, with q (out, in) int8 and scale (out,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        """weight: (out, in) float."""
        super().__init__()
        weight = weight.detach().float().contiguous()
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        self.register_buffer("qweight", (weight / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.out_features, self.in_features = weight.shape
        self._wide: torch.Tensor | None = None  # qweight in bfloat16, for prefill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, in)
        if _in_prefill():
            if self._wide is None or self._wide.dtype != rows.dtype:
                self._wide = self.qweight.to(rows.dtype)
            out = nn.functional.linear(rows, self._wide) * self.scale
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def quantize_int8(model: Any, device: torch.device) -> bool:
    """Swap the model's linear layers (GPT-2's Conv1D too, and the output head) for
    Int8Linear, in place. False, with the model untouched, off CPU or where the
    kernel is missing."""
    if device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        log.warning("QUANTIZE=int8 is for CPU with torch's int8 kernel; keeping %s", model.dtype)
        return False
    from transformers.pytorch_utils import Conv1D

    dtype = torch.bfloat16
    model.to(dtype)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                weight = child.weight  # (out, in)
            elif isinstance(child, Conv1D):
                weight = child.weight.t()  # Conv1D keeps (in, out)
            else:
                continue
            setattr(parent, name, Int8Linear(weight, child.bias, dtype))
            swapped += 1
    log.info("QUANTIZE=int8: %d linear layers hold int8 weights (bfloat16 activations)", swapped)
    return True
