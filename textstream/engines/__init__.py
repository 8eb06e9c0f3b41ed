"""Engines: the only package that imports torch or the `openai` SDK, each only in the
backend that needs it.

`load_engine` picks the backend MODEL_ID names; each backend is imported only when
chosen, so a fake-engine worker never imports torch.
"""

from __future__ import annotations

from textstream.config import Settings
from textstream.engines.base import AnyEngine
from textstream.sources import OpenAISource, is_fake


def load_engine(settings: Settings) -> AnyEngine:
    """The engine MODEL_ID names (raises sources.ModelLoadError if none loads)."""
    if is_fake(settings.model_id):
        from textstream.engines.fake import FakeEngine

        return FakeEngine(settings.model_id)
    upstream = OpenAISource.parse(settings.model_id)
    if upstream is not None:
        from textstream.engines.openai import OpenAIEngine

        return OpenAIEngine(upstream, settings)
    from textstream.engines.transformers.loading import load_transformers

    return load_transformers(settings)
