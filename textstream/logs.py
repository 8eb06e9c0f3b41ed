"""Logging set-up for the API and worker processes.

Replaces whatever handlers are installed (ModelQ calls `basicConfig` at import).
Prompt and completion text never reach the logs unless LOG_PROMPTS=true: code
that would log them calls `redact()`, which returns a length when it is off.
"""

from __future__ import annotations

import logging

from textstream.config import Settings
from textstream.queue import quiet_modelq_logging

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=FORMAT, force=True)
    quiet_modelq_logging()
    # Model downloads and weight loading print progress bars and chatter at INFO.
    for noisy in ("httpx", "huggingface_hub", "transformers", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def redact(text: str, settings: Settings) -> str:
    """The text itself when LOG_PROMPTS=true, otherwise only its length."""
    return repr(text) if settings.log_prompts else f"<{len(text)} chars>"
