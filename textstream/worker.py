"""The body of the ModelQ task: generate one completion and publish its events.

Runs in a ModelQ worker thread. It never raises: a failure becomes an `error`
event for the client and a log line for the operator. (A task that raised would
make ModelQ write the job's payload, prompt included, to `modelq_errors.log`.)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from textstream.config import Settings
from textstream.detokenize import IncrementalDetokenizer
from textstream.engine import Engine, PromptTooLongError
from textstream.events import EventType, EventWriter, error_data
from textstream.logs import redact
from textstream.registry import WorkerHeartbeat
from textstream.schemas import CompletionJob

log = logging.getLogger(__name__)

#: Events a job may produce besides its tokens (status, terminal); sizes MAXLEN.
EXTRA_EVENTS = 64


class CompletionRunner:
    """Runs jobs on one engine; shared by all of a worker process's ModelQ threads."""

    def __init__(
        self, engine: Engine, client: redis.Redis, settings: Settings, heartbeat: WorkerHeartbeat
    ) -> None:
        self._engine = engine
        self._client = client
        self._settings = settings
        self._heartbeat = heartbeat

    def run(self, job: CompletionJob) -> dict[str, Any]:
        writer = EventWriter(
            self._client,
            job.job_id,
            ttl=self._settings.job_ttl,
            maxlen=self._settings.max_new_tokens_limit + EXTRA_EVENTS,
        )
        self._heartbeat.job_started()
        try:
            return self._generate(job, writer)
        except PromptTooLongError as exc:
            return self._fail(job, writer, "prompt_too_long", str(exc))
        except redis.RedisError as exc:
            # The stream itself is unreachable: nothing can be told to the client.
            log.error("job=%s lost Redis while generating: %s", job.job_id, exc)
            return {"status": "error", "error": "redis_unavailable"}
        except Exception as exc:  # e.g. out of memory: end this job, keep serving
            log.exception("job=%s generation failed", job.job_id)
            return self._fail(job, writer, "generation_failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._heartbeat.job_finished()

    def _fail(
        self, job: CompletionJob, writer: EventWriter, error_type: str, message: str
    ) -> dict[str, Any]:
        try:
            writer.write(EventType.ERROR, error_data(error_type, message))
        except redis.RedisError as exc:
            log.error("job=%s could not publish its error: %s", job.job_id, exc)
        return {"status": "error", "error": error_type}

    def _generate(self, job: CompletionJob, writer: EventWriter) -> dict[str, Any]:
        engine = self._engine
        started = time.perf_counter()
        prompt_ids = engine.encode_prompt(job.prompt, job.prompt_format)
        writer.write(
            EventType.STARTED,
            {"worker": self._heartbeat.info.worker_id, "queue_seconds": _since(job.enqueued_at)},
        )
        if writer.cancel_requested:
            return self._fail(job, writer, "cancelled", "the job was cancelled")

        detokenizer = IncrementalDetokenizer(engine.tokenizer)
        finish_reason: str | None = None
        for step in engine.generate(prompt_ids, job.params, lambda: writer.cancel_requested):
            piece = detokenizer.add(step.token_id)
            if piece:
                writer.write(EventType.TOKEN, {"text": piece})
            finish_reason = step.finish_reason
        completion_tokens = len(detokenizer.ids)
        if finish_reason is None:  # generation stopped because a reader asked
            log.info("job=%s cancelled after %d tokens", job.job_id, completion_tokens)
            return self._fail(job, writer, "cancelled", "the job was cancelled")

        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens}
        writer.write(
            EventType.DONE, {"finish_reason": finish_reason, "model": engine.name, "usage": usage}
        )
        seconds = time.perf_counter() - started
        log.info(
            "job=%s done finish=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f "
            "tokens_per_s=%.1f prompt=%s completion=%s",
            job.job_id,
            finish_reason,
            len(prompt_ids),
            completion_tokens,
            seconds,
            completion_tokens / seconds if seconds else 0.0,
            redact(job.prompt, self._settings),
            redact(engine.decode(detokenizer.ids), self._settings),
        )
        return {"status": "done", "finish_reason": finish_reason, "usage": usage}


def _since(timestamp: float) -> float | None:
    return round(time.time() - timestamp, 4) if timestamp else None
