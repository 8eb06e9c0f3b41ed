"""QUANTIZE's layers (engines/transformers/quantize.py) compute what their weights say.

Int4Linear holds 4-bit values in groups of 32 with a scale and an offset each (GGUF
Q4_1's layout) for torch's CPU int4 kernel. These tests check its arithmetic
against a plain matrix product, on both of its paths (the kernel, and the bfloat16
copy prefill takes on CPUs with native bfloat16 products), and that a shape the
kernel cannot take stays int8."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_decoder

from textstream.engines.transformers import quantize
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


@pytest.mark.parametrize("bf16", [False, True], ids=["kernel-prefill", "bf16-prefill"])
@pytest.mark.parametrize("shape", [(48, 64), (96, 576)])
def test_int4_layer_is_its_weights_within_half_a_step(shape, bf16, monkeypatch):
    # Prefill goes through the kernel, or where the CPU multiplies bfloat16
    # natively (bf16_prefill) through a bfloat16 copy of the weights: both here.
    monkeypatch.setattr(quantize, "bf16_prefill", lambda: bf16)
    weight = weights(*shape)
    bias = torch.linspace(-1, 1, shape[0])
    layer = Int4Linear(weight, bias, torch.bfloat16)
    assert (layer.wide is not None) == bf16
    # Each group's values are within half a quantization step of the original
    # (plus bfloat16's rounding of the result).
    groups = weight.reshape(shape[0], -1, 32)
    step = ((groups.amax(-1) - groups.amin(-1)) / 15)[..., None]
    wide = layer.dequantized()
    error = (wide.float().reshape(groups.shape) - groups).abs()
    assert (error <= step / 2 + groups.abs() / 128 + 1e-6).all()
    # A generator of its own: drawn from torch's global one, the input depended on
    # which tests ran before in the process, and 3 (48×64) and 23 (96×576) of 300
    # such draws cross the last bound below (int4's error on an unlucky input).
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, shape[1], generator=generator).to(torch.bfloat16)
    with torch.inference_mode():
        decoded = layer(x).float()  # the int4 kernel
        with prefilling():
            prefilled = layer(x).float()  # the kernel, or the bfloat16 copy
    expected = x.float() @ wide.float().T + bias
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


def write_gguf(path: Path, model: torch.nn.Module, types: dict[str, str]) -> None:
    """A GGUF file holding `model`'s weights under llama.cpp's names, each tensor in
    the type `types` gives it (by GGUF name; float32 otherwise), with a metadata
    array of strings before the tensors, as a real file's vocabulary is."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"token{i}" for i in range(300)])
    for name, parameter in model.state_dict().items():
        tensor = names.get_name(name, try_suffixes=(".weight",))
        if tensor is None or tensor == "output.weight":  # the test's head is tied
            continue
        values = parameter.float().numpy()
        kind = gguf.GGMLQuantizationType[types.get(tensor, "F32")]
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor, values)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(tensor, values.astype("float16"))
        else:
            writer.add_tensor(tensor, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_auto_gives_each_layer_the_kernel_of_its_gguf_type(tmp_path):
    """QUANTIZE=auto reads each weight's type from the file's header: Q4_1 and Q4_0
    layers int4, Q8_0 int8, float32 kept float; a tied head is the embedding's."""
    from transformers import AutoModelForCausalLM

    from textstream.engines.transformers import gguf_types
    from textstream.engines.transformers.quantize import quantize_linears

    model = AutoModelForCausalLM.from_pretrained(
        build_tiny_decoder(tmp_path / "tiny", tie_word_embeddings=True)
    )
    types = {
        "token_embd.weight": "Q8_0",
        "blk.0.attn_q.weight": "Q4_1",
        "blk.0.attn_k.weight": "Q4_0",
        "blk.0.ffn_down.weight": "Q8_0",
        "blk.1.attn_v.weight": "F16",
    }
    gguf_file = tmp_path / "tiny.gguf"
    write_gguf(gguf_file, model, types)
    arch, read = gguf_types.read_types(gguf_file)
    assert arch == "llama"
    assert {k: read[k] for k in types} == types

    layers = gguf_types.plan(model, gguf_file)
    assert layers["model.layers.0.self_attn.q_proj"] == "int4"
    assert layers["model.layers.0.self_attn.k_proj"] == "int4"
    assert layers["model.layers.0.mlp.down_proj"] == "int8"
    assert layers["model.layers.1.self_attn.v_proj"] is None
    assert layers["lm_head"] == "int8"  # token_embd's type: the head is tied to it
    assert len(layers) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())

    assert quantize_linears(model, torch.device("cpu"), "auto", plan=layers)
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "Int4Linear"
    assert kinds["model.layers.0.mlp.down_proj"] == "Int8Linear"
    assert kinds["model.layers.1.self_attn.v_proj"] == "Linear"  # a float layer stays
    assert kinds["model.layers.0.mlp.gate_proj"] == "Linear"  # float32 in the file
    assert kinds["lm_head"] == "Int8Linear"


def test_read_types_refuses_what_is_not_a_gguf_file(tmp_path):
    from textstream.engines.transformers import gguf_types

    for content in (b"not a gguf file", b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 16):
        path = tmp_path / "bad.gguf"
        path.write_bytes(content)
        with pytest.raises(ValueError):
            gguf_types.read_types(path)


def test_types_a_kernel_does_not_hold_stay_float():
    from textstream.engines.transformers.gguf_types import kernel_for

    assert [kernel_for(t) for t in ("Q4_0", "Q4_K", "IQ4_XS", "Q6_K", "Q8_0")] == [
        "int4", "int4", "int4", "int8", "int8",
    ]  # fmt: skip
    assert [kernel_for(t) for t in ("F16", "BF16", "I8", "I32", "type99")] == [None] * 5


def test_a_hostile_header_is_refused_or_read_without_sizing_anything_by_it(tmp_path):
    """Arrays nested deep enough to exhaust the stack are refused (ValueError, which
    the loader turns into float weights); a tensor named blk.99999999999 does not
    size the name table (the model's own block count does)."""
    import struct

    from transformers import AutoModelForCausalLM

    from textstream.engines.transformers import gguf_types

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value)) + value.encode()

    nested = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + text("deep") + struct.pack("<I", 9)
    nested += struct.pack("<IQ", 9, 1) * 5000 + struct.pack("<IQ", 4, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(nested)
    with pytest.raises(ValueError, match="nested"):
        gguf_types.read_types(path)

    model = AutoModelForCausalLM.from_pretrained(build_tiny_decoder(tmp_path / "tiny"))
    gguf_file = tmp_path / "far.gguf"
    write_gguf(gguf_file, model, {"blk.0.attn_q.weight": "Q4_1"})
    with gguf_file.open("r+b") as stream:  # rename blk.1.attn_q.weight in place
        data = stream.read()
        at = data.index(b"blk.1.attn_q.weight")
        stream.seek(at)
        stream.write(b"blk.999999999999.xx")
    layers = gguf_types.plan(model, gguf_file)  # at once, not a table of 10^12 blocks
    assert layers["model.layers.0.self_attn.q_proj"] == "int4"
    assert "model.layers.1.self_attn.q_proj" not in layers  # the file does not name it


def test_an_int8_head_gives_its_highest_logits_in_float32():
    # bfloat16 logits near 25 are 0.125 apart: a float32 lead of 0.08 came out as a
    # tie (SmolLM2, "What is the capital of France?"). The head's highest logits
    # per row are computed again in float32 from its int8 weights.
    weight = weights(500, 64)
    head = Int8Linear(weight, None, torch.bfloat16)
    head.refine = 16
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        logits = head(x)
    assert logits.dtype == torch.float32
    exact = x.float() @ (head.qweight.float() * head.scale.float()[:, None]).T
    top = logits.topk(16).indices
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-6, atol=1e-5)
    assert (logits - exact).abs().max() > 1e-3  # the rest stay bfloat16's
    assert (logits.argmax(1) == exact.argmax(1)).all()
