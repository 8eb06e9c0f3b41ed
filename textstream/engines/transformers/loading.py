"""Loading a Hugging Face causal LM (hub id, directory, .gguf, package file) onto a
device, with MODEL_FALLBACK when MODEL_ID cannot be loaded.

Each stage logs one line with its elapsed time (probing the Hub, tokenizer,
weights, writing the converted copy, warm-up), so a slow start says where its
time goes; progress bars are off, since they garble a log. A GGUF file is
converted once and then loaded from its converted copy (model_cache.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from textstream.config import Settings
from textstream.engines.transformers import gguf_types, model_cache
from textstream.engines.transformers.engine import TransformersEngine
from textstream.engines.transformers.quantize import quantize_linears
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


@contextmanager
def stage(model: str, what: str) -> Iterator[None]:
    """Log one line when a loading stage ends: what it did and how long it took."""
    started = time.perf_counter()
    yield
    log.info("loading %s: %s in %.1fs", model, what, time.perf_counter() - started)


def quiet_progress_bars() -> None:
    """No progress bars in a worker's log: transformers' and the Hub client's are
    switched off; the GGUF converter calls tqdm directly, so its name is rebound."""
    transformers.utils.logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # the gguf package is missing: nothing to convert, no bar
        return
    if hasattr(gguf_utils, "tqdm"):
        gguf_utils.tqdm = partial(gguf_utils.tqdm, disable=True)


def _load_gguf(source: ModelSource, settings: Settings, dtype: torch.dtype) -> tuple[Any, Any]:
    """Tokenizer and model of a GGUF file: from its converted copy when there is one,
    otherwise converted (float32) and then cached for the next start."""
    assert source.gguf_file is not None
    gguf = Path(source.path) / source.gguf_file
    loaded = _from_copy(source, settings, gguf, dtype)
    if loaded is not None:
        return loaded
    with model_cache.converting(gguf, settings.model_cache_dir):
        # A worker that started beside this one may have converted it meanwhile.
        loaded = _from_copy(source, settings, gguf, dtype)
        return loaded if loaded is not None else _convert_gguf(source, settings, gguf, dtype)


def _from_copy(
    source: ModelSource, settings: Settings, gguf: Path, dtype: torch.dtype
) -> tuple[Any, Any] | None:
    """Tokenizer and model from the converted copy of `gguf`; None if there is none
    (or it is damaged: then it is discarded, to be converted again)."""
    cached = model_cache.find(gguf, settings.model_cache_dir)
    if cached is None:
        return None
    try:
        with stage(source.name, f"tokenizer from the converted copy {cached}"):
            tokenizer = AutoTokenizer.from_pretrained(cached)
        with stage(source.name, "weights from the converted copy"):
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        return tokenizer, model
    except Exception as exc:  # a damaged copy: convert again and replace it
        log.warning("converted copy %s cannot be loaded (%s); converting again", cached, exc)
        model_cache.discard(cached)
        return None


@contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """While converting, parse the GGUF file once and build each tensor-name map once.

    transformers reads the file three times to convert it (config, weights,
    tokenizer), and each read parses every metadata field in Python: SmolLM2's
    49,152-token vocabulary and its merges take about ten seconds a time on this
    2-core machine. It also rebuilds gguf's tensor-name map once per weight (397
    times for SmolLM2, 12 s). Both are pure functions of their arguments, so they are
    memoised here, and only while converting (the patched names are restored).
    SmolLM2-135M Q4_1 in a worker: 25 s to convert before, 15 s after (BENCHMARKS.md);
    the weights and vocabulary come out identical."""
    try:
        import gguf
    except ImportError:  # no gguf package: transformers will say so itself
        yield
        return
    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def _convert_gguf(
    source: ModelSource, settings: Settings, gguf: Path, dtype: torch.dtype
) -> tuple[Any, Any]:
    assert source.gguf_file is not None
    log.info("loading %s: converting the GGUF file (first start only)", source.name)
    with gguf_parsed_once():
        with stage(source.name, "tokenizer converted from GGUF"):
            tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        with stage(source.name, "weights dequantized from GGUF"):
            model = AutoModelForCausalLM.from_pretrained(
                source.path, gguf_file=source.gguf_file, dtype=torch.float32
            )
    folder = model_cache.copy_dir(gguf, settings.model_cache_dir)
    with stage(source.name, f"converted copy written to {folder}"):
        model_cache.write(model, tokenizer, folder)
    return tokenizer, model.to(dtype)


def _quantize(model: Any, source: ModelSource, settings: Settings, device: torch.device) -> None:
    """QUANTIZE: int8/int4 for every linear layer; auto: a GGUF file's own types on
    a CPU (gguf_types.py), float for everything else; none: float."""
    if settings.quantize in ("int8", "int4"):
        with stage(source.name, f"weights quantized to {settings.quantize}"):
            quantize_linears(model, device, settings.quantize)
        return
    if settings.quantize == "none" or not source.gguf_file or device.type != "cpu":
        return
    gguf = Path(source.path) / source.gguf_file
    if not gguf.is_file():  # a GGUF in a Hub repository: its types are not at hand
        log.info("QUANTIZE=auto: %s is not a local file; keeping float", source.gguf_file)
        return
    try:
        layers = gguf_types.plan(model, gguf)
    except Exception as exc:  # whatever a damaged or hostile header raises: serve float
        reason = f"{type(exc).__name__}: {exc}"[:200]
        log.warning("QUANTIZE=auto: cannot read %s's types (%s); keeping float", gguf.name, reason)
        return
    if any(layers.values()):
        with stage(source.name, f"weights kept in {gguf_types.describe(layers, gguf)}"):
            quantize_linears(model, device, "auto", plan=layers)


def _load_from(source: ModelSource, settings: Settings, online: bool) -> TransformersEngine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.torch_threads and device.type == "cpu":
        torch.set_num_threads(settings.torch_threads)
    started = time.perf_counter()
    if source.gguf_file and settings.model_cache_dir:
        tokenizer, model = _load_gguf(source, settings, dtype)
    else:
        kwargs: dict[str, Any] = {}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        if not source.is_local and not online:
            kwargs["local_files_only"] = True  # use the local cache only; fail fast
        with stage(source.name, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        with stage(source.name, f"weights ({dtype})"):
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    with stage(source.name, f"moved to {device}"):
        model.to(device)
        model.eval()
    _quantize(model, source, settings, device)
    engine = TransformersEngine(
        model,
        tokenizer,
        name=source.name,
        device=device,
        prompt_format=settings.prompt_format,
        source=source.spec,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        compile_decode=settings.compile,
        compact_pass=settings.compact_pass,
        batch_invariant=settings.batch_invariant,
    )
    with stage(source.name, "warm-up"):
        engine.warm_up()
    engine.load_seconds = time.perf_counter() - started
    return engine


def load_transformers(settings: Settings) -> TransformersEngine:
    """Load MODEL_ID; if that fails and MODEL_FALLBACK is set, load it with a loud warning.

    Raises ModelLoadError (with both reasons) when nothing could be loaded.
    """
    quiet_progress_bars()
    specs = [settings.model_id] + ([settings.model_fallback] if settings.model_fallback else [])
    online: bool | None = None
    failures: list[str] = []
    for index, spec in enumerate(specs):
        if index > 0:
            log.warning(
                "MODEL_ID %r could not be loaded; loading MODEL_FALLBACK %r", specs[0], spec
            )
        try:
            source = ModelSource.parse(spec)
            if not source.is_local and online is None:
                with stage(spec, "probed the Hugging Face Hub"):
                    online = hub_reachable()
                log.info("the Hugging Face Hub is %s", "reachable" if online else "unreachable")
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
