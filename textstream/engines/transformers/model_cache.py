"""A converted copy of each GGUF model on disk, so that only the first start pays
for converting it.

transformers turns a .gguf file into a float model at every load: on 2 cores,
SmolLM2-135M took 25 s of a worker's start (15 s since loading.gguf_parsed_once),
most of it parsing the GGUF metadata in Python, where the same model saved with `save_pretrained`
(safetensors, tokenizer.json) loads in under a second. The first load of a GGUF
file therefore saves what it converted under MODEL_CACHE_DIR, in a folder named
after the file and a hash of its content (its size and its first and last 4 MiB:
the header and metadata, and the last tensors) and of transformers' version. The
same file installed again elsewhere (a new virtualenv, another clone) finds the
copy; a changed file or a new converter makes a new one. Later starts load that
folder instead.

The copy is float32, the values transformers dequantized, so a model loaded from
it computes exactly what the GGUF load does (the DTYPE setting casts after
loading, either way). It is written to a temporary folder beside its final
name and renamed into place, so nobody ever reads a half-written copy. Workers
starting together on one host take turns to convert (`converting`, a file lock):
the first converts, the others wait and then load its copy, instead of each
spending a minute of CPU on the same conversion at once.

Imports nothing heavy, so a process without torch can find a copy (`find`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Bytes hashed from each end of a GGUF file to name its copy (copy_dir): milliseconds
#: to read, where hashing all of a multi-gigabyte file would delay every start.
_SAMPLED = 4 << 20

#: Files a complete copy has (tokenizer files vary with the tokenizer).
_REQUIRED = ("config.json", "model.safetensors")


def copy_dir(gguf_path: Path, cache_dir: str | Path) -> Path:
    """Where the converted copy of `gguf_path` lives (whether or not it exists yet)."""
    import transformers

    resolved = gguf_path.resolve()
    digest = hashlib.sha256(f"{transformers.__version__}\0".encode())
    with open(resolved, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(f"{size}\0".encode())
        digest.update(file.read(_SAMPLED))
        if size > _SAMPLED:
            file.seek(max(_SAMPLED, size - _SAMPLED))
            digest.update(file.read(_SAMPLED))
    return Path(cache_dir).expanduser() / "converted" / f"{resolved.stem}-{digest.hexdigest()[:16]}"


def find(gguf_path: Path, cache_dir: str | Path) -> Path | None:
    """The converted copy of `gguf_path`, if a complete one exists."""
    return _complete(copy_dir(gguf_path, cache_dir))


@contextlib.contextmanager
def converting(gguf_path: Path, cache_dir: str | Path) -> Iterator[None]:
    """Held while this process converts `gguf_path`: another process converting the
    same file waits here, then finds the copy (`find`) instead of converting too.
    The lock is the kernel's (flock): a converter that dies releases it. Where no
    lock file can be made (read-only disk), nobody waits."""
    folder = copy_dir(gguf_path, cache_dir)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.parent / f".{folder.name}.lock", "a")  # noqa: SIM115
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write(model: Any, tokenizer: Any, folder: Path) -> bool:
    """Save `model` (float32, dequantized from GGUF) and `tokenizer` as `folder`,
    atomically. Returns False, and leaves nothing behind, if it could not."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    quantizer = getattr(model, "hf_quantizer", None)
    quantization = getattr(model.config, "quantization_config", None)
    try:
        # The weights are plain float tensors once dequantized, but transformers
        # refuses to save a model that still names a GGUF quantizer: detach it
        # for the save (nothing at inference time reads either).
        model.hf_quantizer = None
        if quantization is not None:
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:
            if _complete(folder) is None:
                raise
            # Another worker renamed its own copy into place first: keep that one.
        return True
    except Exception as exc:  # read-only or full disk: serve anyway, convert next time
        log.warning("could not cache the converted model in %s: %s", folder, exc)
        return False
    finally:
        model.hf_quantizer = quantizer
        if quantization is not None:
            model.config.quantization_config = quantization
        shutil.rmtree(staging, ignore_errors=True)


def _complete(folder: Path) -> Path | None:
    return folder if all((folder / name).is_file() for name in _REQUIRED) else None


def discard(folder: Path) -> None:
    """Remove a copy that failed to load (it is rebuilt at the next conversion)."""
    trash = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.broken"
    try:
        folder.rename(trash)  # atomic: a concurrent reader sees it whole or not at all
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)
