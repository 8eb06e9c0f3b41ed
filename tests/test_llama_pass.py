"""The compact Llama pass (engines/transformers/llama.py) computes what transformers'
own forward computes, and keeps the batch contract.

Llama-shaped models (llama, mistral, qwen2) decode through it by default; these tests
compare it with transformers' forward on the same weights (COMPACT_PASS=false), on
small random models of each shape it takes: grouped-query and plain attention, q/k/v
biases (qwen2), float32, QUANTIZE=int8 and QUANTIZE=int4."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_batching import PROMPTS, greedy, ids, load, staggered
from tiny_models import build_tiny_decoder

from textstream.engines.transformers.llama import INT4_BLOCK, LlamaPass, _SideBySide
from textstream.engines.transformers.passes import Passes
from textstream.engines.transformers.quantize import Int4Linear

SHAPES = {
    "llama-gqa": ("llama", {}),
    # Every joined size a multiple of 64: int4's packed weights join too (in the
    # others they are called side by side).
    "llama-mha": ("llama", {"num_key_value_heads": 4, "intermediate_size": 128}),
    "qwen2-bias": ("qwen2", {}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def decoder_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type, shape = SHAPES[request.param]
    return build_tiny_decoder(
        tmp_path_factory.mktemp("models") / request.param, model_type, **shape
    )


def passes_of(engine) -> Passes:  # type: ignore[no-untyped-def]
    assert engine.passes is not None
    return engine.passes


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
@pytest.mark.parametrize(
    "prompts",
    [
        # Rows of different lengths: prefill padded, each decode step masked.
        [[5, 6, 7, 8, 9, 10, 11], [300, 301], [42, 43, 44, 45]],
        # One row: its decode steps see every column (the unmasked kernel).
        [[5, 6, 7, 8, 9, 10, 11]],
    ],
    ids=["rows", "alone"],
)
def test_compact_pass_gives_transformers_logits(decoder_dir, quantize, prompts):
    compact = passes_of(load(decoder_dir, batching=False, quantize=quantize))
    native = passes_of(load(decoder_dir, batching=False, quantize=quantize, compact_pass=False))
    assert isinstance(compact._forward, LlamaPass)
    assert not isinstance(native._forward, LlamaPass)
    if quantize == "int4":  # joined into one product where the packing allows it
        qkv = compact._forward.layers[0].qkv
        joinable = all(size % INT4_BLOCK == 0 for size in qkv.sizes)
        assert isinstance(qkv.inner, Int4Linear if joinable else _SideBySide)
    with torch.inference_mode():
        caches = [compact.new_cache(), native.new_cache()]
        # One prefill, then decode steps where each row sits at its own position.
        logits = [
            p.prefill(c, prompts, [0] * len(prompts))
            for p, c in zip((compact, native), caches, strict=True)
        ]
        lengths = [len(p) for p in prompts]
        for _ in range(12):
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
            tokens = [int(t) for t in logits[1].argmax(-1)]
            assert tokens == [int(t) for t in logits[0].argmax(-1)]
            logits = [
                p.decode(c, tokens, lengths) for p, c in zip((compact, native), caches, strict=True)
            ]
            lengths = [n + 1 for n in lengths]


def test_batched_compact_pass_gives_transformers_tokens_alone(decoder_dir):
    native = load(decoder_dir, batching=False, compact_pass=False)
    batched = load(decoder_dir, batching=True)
    assert isinstance(passes_of(batched)._forward, LlamaPass)
    jobs = [(prompt, greedy(12 + 6 * i), 0) for i, prompt in enumerate(PROMPTS)]
    expected = [ids(native, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched, jobs) == expected
    # The joined q/k/v and gate/up weights are the layers' own memory, not a copy.
    attn = batched.model.model.layers[0].self_attn
    joined = passes_of(batched)._forward.layers[0].qkv.inner.weight  # type: ignore[attr-defined]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()


def test_models_the_compact_pass_does_not_know_keep_transformers_forward(tiny_model_dir):
    gpt2 = load(tiny_model_dir, batching=False)
    assert not isinstance(passes_of(gpt2)._forward, LlamaPass)
