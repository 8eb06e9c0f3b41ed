"""Engines: the only package that imports torch (and only in the backend that needs it).

`load_engine` picks the backend MODEL_ID names; each backend is imported only when
chosen, so a fake-engine worker never imports torch.
"""

from __future__ import annotations

from textstream.config import Settings
from textstream.engines.base import Engine
from textstream.sources import is_fake


def load_engine(settings: Settings) -> Engine:
    """The engine MODEL_ID names (raises sources.ModelLoadError if none loads)."""
    if is_fake(settings.model_id):
        from textstream.engines.fake import FakeEngine

        return FakeEngine(settings.model_id)
    from textstream.engines.transformers.loading import load_transformers

    return load_transformers(settings)
