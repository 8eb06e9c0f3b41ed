"""Loading a Hugging Face causal LM (hub id, directory, .gguf, package file) onto a
device, with MODEL_FALLBACK when MODEL_ID cannot be loaded."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from textstream.config import Settings
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.quantize import quantize_int8
from textstream.sources import ModelLoadError, ModelSource, hub_reachable

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _load_from(source: ModelSource, settings: Settings, online: bool) -> TransformersEngine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.torch_threads and device.type == "cpu":
        torch.set_num_threads(settings.torch_threads)
    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if not source.is_local and not online:
        kwargs["local_files_only"] = True  # use the local cache only; fail fast
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    if settings.quantize == "int8":
        quantize_int8(model, device)
    engine = TransformersEngine(
        model,
        tokenizer,
        name=source.name,
        device=device,
        prompt_format=settings.prompt_format,
        source=source.spec,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        compile_decode=settings.compile,
    )
    engine.warm_up()
    engine.load_seconds = time.perf_counter() - started
    return engine


def load_transformers(settings: Settings) -> TransformersEngine:
    """Load MODEL_ID; if that fails and MODEL_FALLBACK is set, load it with a loud warning.

    Raises ModelLoadError (with both reasons) when nothing could be loaded.
    """
    specs = [settings.model_id] + ([settings.model_fallback] if settings.model_fallback else [])
    online: bool | None = None
    failures: list[str] = []
    for index, spec in enumerate(specs):
        try:
            source = ModelSource.parse(spec)
            if not source.is_local and online is None:
                online = hub_reachable()
            engine = _load_from(source, settings, bool(online))
        except Exception as exc:  # any loader failure: report it, try the fallback
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            failures.append(f"{spec!r} ({reason})")
            log.error("could not load model %r: %s", spec, reason)
            continue
        if index > 0:
            log.warning(
                "!!! MODEL_ID %r could not be loaded; serving the FALLBACK model %r instead !!!",
                settings.model_id,
                spec,
            )
        log.info("model %s loaded on %s in %.1fs", engine.name, engine.device, engine.load_seconds)
        return engine
    raise ModelLoadError("no model could be loaded: " + "; ".join(failures))
