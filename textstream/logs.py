"""Logging for the API and worker processes.

- LOG_FORMAT=auto (the default): human lines when stderr is a terminal, JSON when
  it is not (a file, a pipe, a container's log collector). LOG_FORMAT=json: one
  JSON object per line, fields given as `extra={"fields": {...}}` as top-level
  keys. LOG_FORMAT=text: one aligned line per event (time, level, process,
  message, then the fields as key=value).
- The API logs one line per request (api/requestlog.py): id, method, route,
  status, duration, job id, caller (a key's hash, never the key).
- Prompt and completion text never reach the logs unless LOG_PROMPTS=true: code
  that would log them calls `redact()`, and paths that carry a prompt
  (`/completion/{question}`) are logged with the prompt replaced by its length,
  in our request lines and in uvicorn's access log alike.
- Replaces whatever handlers are installed (ModelQ calls `basicConfig` at import).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, TextIO

from textstream.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(processName)-14s %(message)s"
TEXT_DATE_FORMAT = "%H:%M:%S"

#: Paths whose remainder is the prompt itself.
PROMPT_PATH_PREFIXES = ("/completion/",)

#: LOG_PROMPTS, as the process's configure_logging read it: the one switch that
#: redact() and redact_path() both follow.
_log_prompts = False


def redact_path(path: str) -> str:
    if _log_prompts:
        return path
    for prefix in PROMPT_PATH_PREFIXES:
        if path.startswith(prefix):
            return f"{prefix}<{len(path) - len(prefix)} chars>"
    return path


#: How redis-py's pipeline prefixes the error of a failed command: with the
#: command, arguments and all (a job's token text, a prompt).
PIPELINE_ERROR = " of pipeline caused error: "


def brief(exc: BaseException) -> str:
    """An exception as a log line may show it: its type and Redis's message, without
    the command a failed pipeline quotes before it (`Command # 2 (EVALSHA … <the
    token's text>) of pipeline caused error: READONLY …`)."""
    message = str(exc).rsplit(PIPELINE_ERROR, 1)[-1]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def quiet_modelq_logging() -> None:
    """ModelQ (1.0.19) calls logging.basicConfig(INFO) at import and logs task
    arguments (prompts) at INFO; keep only its warnings. (By the logger's name:
    configuring logging must not import ModelQ.)"""
    logging.getLogger("modelq").setLevel(logging.WARNING)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", {})
        return line + "".join(f" {k}={v}" for k, v in fields.items())


#: Query parameters that are secrets (a job's stream token) or prompt text.
SECRET_PARAMS = re.compile(r"(?i)(^|&)(access_token|api_key|key|token)=[^&]*")


def redact_query(query: str) -> str:
    """A query string with secret values replaced: `access_token=<redacted>`."""
    return SECRET_PARAMS.sub(lambda m: f"{m[1]}{m[2]}=<redacted>", query)


class RedactPromptPaths(logging.Filter):
    """uvicorn's access log prints the request path and query: in
    `/completion/{question}` the path is the prompt (logged as its length), and
    `/jobs/{id}/events?access_token=...` carries a secret (redacted)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, sep, query = args[2].partition("?")
            line = redact_path(path) + sep + redact_query(query)
            record.args = (args[0], args[1], line, args[3], args[4])
        return True


def log_format(setting: str, stream: TextIO) -> str:
    """`json` or `text`: LOG_FORMAT as set, or for `auto` text on a terminal only."""
    if setting != "auto":
        return setting
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure_logging(settings: Settings) -> None:
    global _log_prompts
    _log_prompts = settings.log_prompts
    handler = logging.StreamHandler()
    if log_format(settings.log_format, sys.stderr) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT, TEXT_DATE_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    quiet_modelq_logging()
    # Model downloads and weight loading print progress bars and chatter at INFO;
    # the HTTP clients log each request's URL (an upstream's may hold credentials).
    # (The `openai` SDK's client logs as `httpx2`.)
    noisy_loggers = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "huggingface_hub")
    for noisy in (*noisy_loggers, "transformers", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    access = logging.getLogger("uvicorn.access")
    for old in [f for f in access.filters if isinstance(f, RedactPromptPaths)]:
        access.removeFilter(old)
    access.addFilter(RedactPromptPaths())


def redact(text: str) -> str:
    """The text itself when LOG_PROMPTS=true, otherwise only its length."""
    return repr(text) if _log_prompts else f"<{len(text)} chars>"
