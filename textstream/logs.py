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


#: Paths whose remainder is the prompt itself.
PROMPT_PATH_PREFIXES = ("/completion/",)


class RedactPromptPaths(logging.Filter):
    """uvicorn's access log prints the request path, and in `/completion/{question}`
    the path is the prompt. Replace it with its length (the query string stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, sep, query = args[2].partition("?")
            for prefix in PROMPT_PATH_PREFIXES:
                if path.startswith(prefix):
                    hidden = f"{prefix}<{len(path) - len(prefix)} chars>{sep}{query}"
                    record.args = (args[0], args[1], hidden, args[3], args[4])
        return True


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format=FORMAT, force=True)
    quiet_modelq_logging()
    access = logging.getLogger("uvicorn.access")
    for old in [f for f in access.filters if isinstance(f, RedactPromptPaths)]:
        access.removeFilter(old)
    if not settings.log_prompts:
        access.addFilter(RedactPromptPaths())
    # Model downloads and weight loading print progress bars and chatter at INFO.
    for noisy in ("httpx", "huggingface_hub", "transformers", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def redact(text: str, settings: Settings) -> str:
    """The text itself when LOG_PROMPTS=true, otherwise only its length."""
    return repr(text) if settings.log_prompts else f"<{len(text)} chars>"
