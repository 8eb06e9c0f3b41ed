"""The compact Llama pass (engines/transformers/llama.py) computes what transformers'
own forward computes, and keeps the batch contract.

Llama-shaped models (llama, mistral, qwen2) decode through it by default; these tests
compare it with transformers' forward on the same weights (COMPACT_PASS=false), on
small random models of each shape it takes: grouped-query and plain attention, q/k/v
biases (qwen2), float32, QUANTIZE=int8 and QUANTIZE=int4."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from test_batching import PROMPTS, greedy, ids, load, staggered
from tiny_models import build_tiny_decoder

from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.llama import INT4_BLOCK, LlamaPass, _SideBySide
from textstream.engines.transformers.passes import Passes
from textstream.engines.transformers.quantize import Int4Linear

SHAPES = {
    "llama-gqa": ("llama", {}),
    # Every joined size a multiple of 64: int4's packed weights join too (in
    # llama-gqa they are called side by side).
    "llama-mha": ("llama", {"num_key_value_heads": 4, "intermediate_size": 128}),
    # q/k/v biases, joined (int4 too: whole packed blocks).
    "qwen2-bias": ("qwen2", {"num_key_value_heads": 4, "intermediate_size": 128}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def decoder_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type, shape = SHAPES[request.param]
    return build_tiny_decoder(
        tmp_path_factory.mktemp("models") / request.param, model_type, **shape
    )


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_decoder(tmp_path_factory.mktemp("models") / "gqa", "llama")


@functools.cache
def loaded(
    model_dir: Path, quantize: str, compact_pass: bool, batch_invariant: bool = False
) -> TransformersEngine:
    """One engine per model and settings for the module (its passes are stateless:
    each test makes its own caches)."""
    return load(
        model_dir,
        batching=False,
        quantize=quantize,
        compact_pass=compact_pass,
        batch_invariant=batch_invariant,
    )


def passes_of(engine) -> Passes:  # type: ignore[no-untyped-def]
    assert engine.passes is not None
    return engine.passes


@pytest.mark.parametrize(
    ("quantize", "invariant"),
    [("none", False), ("int8", False), ("int8", True), ("int4", False), ("int4", True)],
    ids=["none", "int8", "int8-invariant", "int4", "int4-invariant"],
)
@pytest.mark.parametrize(
    ("prompts", "split"),
    [
        # One row: its decode steps see every column (the unmasked kernel).
        ([[5, 6, 7, 8, 9, 10, 11]], 0),
        # Rows of different lengths, prefilled in two chunks (the second after the
        # first's columns, padded), then each decode step masked.
        ([[5, 6, 7, 8, 9, 10, 11], [300, 301, 302], [42, 43, 44, 45, 46]], 2),
    ],
    ids=["alone", "rows"],
)
def test_compact_pass_gives_transformers_logits(decoder_dir, quantize, invariant, prompts, split):
    compact = passes_of(loaded(decoder_dir, quantize, compact_pass=True, batch_invariant=invariant))
    native = passes_of(loaded(decoder_dir, quantize, compact_pass=False))
    assert isinstance(compact._forward, LlamaPass)
    assert not isinstance(native._forward, LlamaPass)
    if quantize == "int4":  # joined into one product where the packing allows it
        qkv = compact._forward.layers[0].qkv
        joinable = all(size % INT4_BLOCK == 0 for size in qkv.sizes)
        assert isinstance(qkv.inner, Int4Linear if joinable else _SideBySide)
    # BATCH_INVARIANT in bfloat16: the compact pass attends row by row
    # (llama._row_spans), so its rows match transformers' forward on each row alone.
    reference = ByRows(native, len(prompts)) if invariant else Together(native)
    runs = [Together(compact), reference]
    with torch.inference_mode():
        # One prefill, then decode steps where each row sits at its own position.
        for start, chunks in (
            (0, [p[:split] for p in prompts]),
            (split, [p[split:] for p in prompts]),
        ):
            if not chunks[0]:
                continue
            logits = [run.prefill(chunks, [start] * len(chunks)) for run in runs]
        lengths = [len(p) for p in prompts]
        for _ in range(12):
            torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
            tokens = [int(t) for t in logits[1].argmax(-1)]
            assert tokens == [int(t) for t in logits[0].argmax(-1)]
            logits = [run.decode(tokens, lengths) for run in runs]
            lengths = [n + 1 for n in lengths]


class Together:
    """Rows in one cache, each pass for all of them."""

    def __init__(self, passes: Passes) -> None:
        self.passes, self.cache = passes, passes.new_cache()

    def prefill(self, chunks: list[list[int]], offsets: list[int]) -> torch.Tensor:
        return self.passes.prefill(self.cache, chunks, offsets)

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        return self.passes.decode(self.cache, tokens, lengths)


class ByRows:
    """Each row alone, in a cache of its own."""

    def __init__(self, passes: Passes, rows: int) -> None:
        self.passes, self.caches = passes, [passes.new_cache() for _ in range(rows)]

    def prefill(self, chunks: list[list[int]], offsets: list[int]) -> torch.Tensor:
        return torch.cat(
            [
                self.passes.prefill(c, [x], [o])
                for c, x, o in zip(self.caches, chunks, offsets, strict=True)
            ]
        )

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        return torch.cat(
            [
                self.passes.decode(c, [t], [n])
                for c, t, n in zip(self.caches, tokens, lengths, strict=True)
            ]
        )


def test_batched_compact_pass_gives_transformers_tokens_alone(decoder_dir):
    native = loaded(decoder_dir, "none", compact_pass=False)
    batched = load(decoder_dir, batching=True)
    assert isinstance(passes_of(batched)._forward, LlamaPass)
    jobs = [(prompt, greedy(12 + 6 * i), 0) for i, prompt in enumerate(PROMPTS)]
    expected = [ids(native, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched, jobs) == expected
    # The joined q/k/v and gate/up weights are the layers' own memory, not a copy.
    attn = batched.model.model.layers[0].self_attn
    joined = passes_of(batched)._forward.layers[0].qkv.inner.weight  # type: ignore[attr-defined]
    assert attn.k_proj.weight.untyped_storage().data_ptr() == joined.untyped_storage().data_ptr()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_batch_invariant_quantized_rows_get_exactly_their_logits_alone(decoder_dir, quantize):
    # In bfloat16 the CPU attention kernel's sums depend on the number of columns
    # it is given: over a batch's width (its longest row's) a shorter row's logits
    # moved by up to 0.0625, enough to flip near-ties. With BATCH_INVARIANT rows
    # attend one by one over their own columns, so each row's logits are bit for
    # bit its logits alone: in a prefill group (padded to the longest chunk, a
    # second chunk after the first's columns) and in decode steps.
    # Each row is fed the tokens it picks alone.
    passes = passes_of(loaded(decoder_dir, quantize, compact_pass=True, batch_invariant=True))
    prompts = [list(range(40, 66)), [5, 6, 7, 8, 9], [300]]  # the one-token row last
    split, steps = 3, 12
    with torch.inference_mode():
        fed: list[list[int]] = []
        alone: list[list[torch.Tensor]] = []
        for prompt in prompts:
            cache = passes.new_cache()
            logits = [passes.prefill(cache, [prompt[:split]], [0])[0]]
            if prompt[split:]:
                logits = [passes.prefill(cache, [prompt[split:]], [split])[0]]
            tokens = [int(logits[0].argmax())]
            for step in range(steps):
                logits.append(passes.decode(cache, tokens[-1:], [len(prompt) + step])[0])
                tokens.append(int(logits[-1].argmax()))
            fed.append(tokens)
            alone.append(logits)
        cache = passes.new_cache(rows=len(prompts))
        first = passes.prefill(cache, [p[:split] for p in prompts], [0] * len(prompts))
        second = passes.prefill(cache, [p[split:] for p in prompts[:2]], [split, split])
        batch = torch.cat([second, first[2:]])
        for step in range(steps + 1):
            for row in range(len(prompts)):
                assert torch.equal(batch[row], alone[row][step]), f"row {row}, step {step}"
            if step < steps:
                batch = passes.decode(
                    cache, [t[step] for t in fed], [len(p) + step for p in prompts]
                )


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_batch_invariant_requests_get_their_greedy_tokens_alone(gqa_dir, quantize):
    # Requests joining a running batch one after another (their prefills, rows
    # moving as others leave), against the compact pass alone.
    alone = loaded(gqa_dir, quantize, compact_pass=True)
    batched = load(gqa_dir, batching=True, quantize=quantize, batch_invariant=True)
    jobs = [(prompt, greedy(12 + 6 * i), 0) for i, prompt in enumerate(PROMPTS)]
    expected = [ids(alone, prompt, params) for prompt, params, _ in jobs]
    assert staggered(batched, jobs) == expected


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_a_replay_leaves_exactly_what_decode_steps_left(decoder_dir, quantize):
    # A job taken over resumes from the tokens another worker published. Its prompt
    # is prefilled as it was; the published tokens are replayed (Passes.replay) and
    # must leave bit for bit the logits and cache that worker's decode steps left,
    # or a greedy stream taken over can pick another token at a near-tie. (A
    # prefill of them would not: int8/int4 prefill with a bfloat16 copy of the
    # weights, and a chunk's queries attend in one call.) The int8/int4 kernels
    # give each row the same numbers whatever the row count; float32's matrix
    # product does not (one row and several are summed in different orders), so
    # there it is float32 rounding, as a prefill's.
    same = torch.equal if quantize != "none" else functools.partial(torch.allclose, atol=1e-4)
    passes = passes_of(loaded(decoder_dir, quantize, compact_pass=True))
    prompt, steps = list(range(40, 66)), 12
    with torch.inference_mode():
        cache = passes.new_cache()
        logits = passes.prefill(cache, [prompt], [0])
        tokens: list[int] = []
        for step in range(steps):
            tokens.append(int(logits[0].argmax()))
            logits = passes.decode(cache, tokens[-1:], [len(prompt) + step])
        after = passes.decode(cache, [int(logits[0].argmax())], [len(prompt) + steps])
        for chunk in (5, 256):  # chunks bound the activations only
            replayed = passes.new_cache()
            passes.prefill(replayed, [prompt], [0])
            assert same(passes.replay(replayed, tokens, len(prompt), chunk), logits)
            step = passes.decode(replayed, [int(logits[0].argmax())], [len(prompt) + steps])
            assert same(step, after)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_job_taken_over_continues_its_greedy_text_exactly(gqa_dir, quantize):
    # The engine's side of a takeover: generate() from the prompt and the tokens
    # published so far (`generated`) goes on with the tokens the uninterrupted run
    # chose, alone and in a running batch; with 16-token chunks the batcher replays
    # 30 published tokens over two of its loops.
    alone = loaded(gqa_dir, quantize, compact_pass=True)
    batched = load(gqa_dir, batching=True, quantize=quantize)
    chunked = load(gqa_dir, batching=True, quantize=quantize, prefill_chunk_tokens=16)
    prompt = alone.encode_prompt(PROMPTS[0])
    full = [s.token_id for s in alone.generate(prompt, greedy(40))]
    for engine in (alone, batched, chunked):
        for published in (1, 9, 30):
            resumed = engine.generate(
                prompt + full[:published], greedy(40 - published), generated=published
            )
            assert [s.token_id for s in resumed] == full[published:], (engine.batcher, published)


def test_models_the_compact_pass_does_not_know_keep_transformers_forward(tiny_model_dir):
    gpt2 = load(tiny_model_dir, batching=False)
    assert not isinstance(passes_of(gpt2)._forward, LlamaPass)


def test_linear_layers_the_pass_does_not_know_keep_transformers_forward(decoder_dir):
    # A checkpoint loaded already quantized (bitsandbytes, GPTQ...) has linear layers
    # of its own classes: joining their `.weight` would drop their scales.
    from torch import nn

    from textstream.engines.transformers.llama import compact_pass

    class Foreign(nn.Linear):
        pass

    engine = load(decoder_dir, batching=False, compact_pass=False)
    attn = engine.model.model.layers[1].self_attn
    foreign = Foreign(attn.v_proj.in_features, attn.v_proj.out_features)
    attn.v_proj = foreign
    assert compact_pass(engine.model) is None
