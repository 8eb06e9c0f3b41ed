"""QUANTIZE's layers (engines/transformers/quantize.py) compute what their weights say.

Int4Linear holds 4-bit values in groups of 32 with a scale and an offset each (GGUF
Q4_1's layout) for torch's CPU int4 kernel. These tests check its arithmetic
against a plain matrix product, on both of its paths (the kernel for decode, a
bfloat16 matrix for prefill), and that a shape the kernel cannot take stays int8."""

from __future__ import annotations

import pytest
import torch

from textstream.engines.transformers.quantize import (
    Int4Linear,
    Int8Linear,
    _int4,
    prefilling,
)


def weights(out_features: int, in_features: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[0, :32] += 5.0  # one group far off zero: its offset must carry it
    return weight


@pytest.mark.parametrize("shape", [(48, 64), (96, 576)])
def test_int4_layer_is_its_weights_within_half_a_step(shape):
    weight = weights(*shape)
    bias = torch.linspace(-1, 1, shape[0])
    layer = Int4Linear(weight, bias, torch.bfloat16)
    # Each group's values are within half a quantization step of the original
    # (plus bfloat16's rounding of the result).
    groups = weight.reshape(shape[0], -1, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15)[..., None]
    error = (layer.wide.float().reshape(groups.shape) - groups).abs()
    assert (error <= step / 2 + groups.abs() / 128 + 1e-6).all()
    # A generator of its own: drawn from torch's global one, the input depended on
    # which tests ran before in the process, and 3 (48×64) and 23 (96×576) of 300
    # such draws cross the last bound below (int4's error on an unlucky input).
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, shape[1], generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        decoded = layer(x).float()  # the int4 kernel
        with prefilling():
            prefilled = layer(x).float()  # the bfloat16 matrix
    expected = x.float() @ layer.wide.float().T + bias
    scale = expected.abs().max()
    torch.testing.assert_close(decoded, expected, rtol=0, atol=float(scale) * 0.02)
    torch.testing.assert_close(prefilled, expected, rtol=0, atol=float(scale) * 0.02)
    # Against the float weights: the quantization error only.
    exact = x.float() @ weight.T + bias
    assert (decoded - exact).abs().max() < 0.1 * exact.abs().max()


@pytest.mark.parametrize("shape", [(50, 64), (48, 40)])
def test_shapes_the_int4_kernel_refuses_stay_int8(shape):
    # 50 outputs: not a multiple of 16 (torch's packing); 40 inputs: not whole groups.
    layer = _int4(weights(*shape), None, torch.bfloat16)
    assert isinstance(layer, Int8Linear)
    assert isinstance(_int4(weights(48, 64), None, torch.bfloat16), Int4Linear)
