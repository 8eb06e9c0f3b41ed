"""The body of the ModelQ task: generate one completion and publish its events.

Runs in a ModelQ worker thread. It never raises: a failure becomes an `error`
event for the client and a log line for the operator. (A task that raised would
make ModelQ write the job's payload, prompt included, to `modelq_errors.log`.)

A job may reach this code more than once. ModelQ gives a job back to the queue
when its worker stops heartbeating (killed, or drained past its grace period).
The next worker reads the job's stream, finds the tokens already published (each
token event carries its ids), and continues from prompt + those ids. It marks the
seam with a `resumed` event. Greedy output is then identical to an uninterrupted
run; seeded sampling restarts its random stream at the seam.

Stop strings hold text back (stops.py), so the last events may have released text
whose ids are not yet attached. The new worker regenerates those ids and skips the
characters the client already has.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from textstream.config import Settings
from textstream.connections import REDIS_ERRORS, SyncStreamsClient
from textstream.engines.base import (
    AnyEngine,
    LogprobsError,
    Piece,
    PromptTooLongError,
    Published,
    UpstreamError,
    generate,
)
from textstream.grammars import GrammarError
from textstream.job import CompletionJob
from textstream.logs import brief, redact
from textstream.registry import WorkerHeartbeat
from textstream.tools import ToolError
from textstream.transport.events import (
    CANCELLED,
    QUEUE_TIMEOUT,
    TIMEOUT,
    ErrorType,
    EventType,
    JobEvent,
    WriteOutcome,
    error_data,
    stream_maxlen,
)
from textstream.worker.detokenize import IncrementalDetokenizer
from textstream.worker.metrics import JobMetrics, JobTimings
from textstream.worker.stops import StopMatcher
from textstream.worker.writer import EventWriter, StreamFlusher

log = logging.getLogger(__name__)

#: The usage of a job that never ran (settles its fair-share estimate to nothing).
NOTHING_USED = {"prompt_tokens": 0, "completion_tokens": 0}


class TokenPublisher:
    """Turns generated ids into `token` events: ids -> safe text (detokenize.py) ->
    stop-string filter (stops.py) -> one event per released piece.

    An event carries the ids of all text released up to it, once none of that
    text is held back any more; a takeover resumes from exactly those ids.

    At most `max_chars` characters are published in all (`delivered` of them by
    earlier attempts): past them the text is cut and `capped` is set, so that an
    upstream sending endless or huge pieces cannot fill Redis (MAX_OUTPUT_CHARS).
    """

    def __init__(
        self,
        writer: EventWriter,
        detokenizer: IncrementalDetokenizer | None,
        stops: StopMatcher,
        skip_chars: int = 0,
        on_token: Callable[[], None] = lambda: None,
        *,
        max_chars: int = 1 << 62,
        delivered: int = 0,
    ) -> None:
        self._on_token = on_token
        self._room = max(0, max_chars - delivered)  # characters still allowed
        #: The text reached `max_chars` and was cut there.
        self.capped = self._room == 0
        self._writer = writer
        self._detokenizer = detokenizer
        self._stops = stops
        self._skip = skip_chars  # already delivered by the worker we took over from
        self._pending: list[int] = []  # ids whose text is not yet fully released
        self._logprobs: list[list[Any]] = []  # theirs, when the job asked for logprobs
        #: Pieces a text engine gave (its stand-in for a token count).
        self.pieces = 0
        #: The text this attempt released (for LOG_PROMPTS).
        self.released = ""

    @property
    def stopped(self) -> bool:
        return self._stops.stopped

    @property
    def ids(self) -> list[int]:
        return self._detokenizer.ids if self._detokenizer is not None else []

    def add(self, piece: Piece) -> None:
        """A generated piece: a token id, with its logprobs (Step.logprobs) if the
        job asked, which travel in the event that carries the id (`logprobs`, see
        _logprob_entry); or a text engine's text, whole characters, no ids (an empty
        one, a chunk carrying only the finish reason or usage, is no token), its
        tokens' logprobs, if the upstream sent them, going with the event that
        releases the text."""
        if piece.token_id is None:
            self._logprobs.extend(piece.logprobs or ())
            if piece.text:
                self.pieces += 1
                self._release(self._stops.feed(piece.text))
            return
        assert self._detokenizer is not None
        self._pending.append(piece.token_id)
        if piece.logprobs is not None:
            self._logprobs.append(self._logprob_entry(piece.token_id, piece.logprobs))
        text = self._detokenizer.add(piece.token_id)
        if text:
            self._release(self._stops.feed(text))

    def flush(self) -> None:
        """Generation ended: release text still held for a possible stop string."""
        self._release(self._stops.flush())

    def _release(self, text: str) -> None:
        if self._skip:
            skipped = min(self._skip, len(text))
            text, self._skip = text[skipped:], self._skip - skipped
        if len(text) > self._room:
            text, self.capped = text[: self._room], True
        self._room -= len(text)
        if not text:
            return
        self.released += text
        complete = not self._stops.held
        data: dict[str, Any] = {"text": text}
        if complete and self._logprobs:
            data["logprobs"] = self._logprobs
        self._writer.write(EventType.TOKEN, data, self._pending if complete else ())
        self._on_token()
        if complete:
            self._pending, self._logprobs = [], []

    def _logprob_entry(
        self, token_id: int, logprobs: tuple[float, list[tuple[int, float]]]
    ) -> list[Any]:
        """[token, logprob, [[token, logprob(, bytes)], ...](, bytes)] for a token
        event's `logprobs`: each token as its own text (special tokens spelt out; a
        piece of a character as U+FFFD, its UTF-8 bytes then added as a list),
        logprobs rounded to 6 places (compact in Redis)."""
        chosen, top = logprobs
        return self._spelt(token_id, chosen, [self._spelt(alt, value) for alt, value in top])

    def _spelt(self, token_id: int, logprob: float, *more: Any) -> list[Any]:
        assert self._detokenizer is not None
        text, raw = self._detokenizer.spell(token_id)
        return [text, round(logprob, 6), *more, *([raw] if raw is not None else [])]


class CompletionRunner:
    """Runs jobs on one engine; shared by all of a worker process's ModelQ threads.

    `client` is the queue's Redis (metrics); `streams` the job streams' (the same
    Redis by default, or a Redis Cluster); `flusher` gathers tokens when
    STREAM_FLUSH_MS > 0."""

    def __init__(
        self,
        engine: AnyEngine,
        client: redis.Redis,
        settings: Settings,
        heartbeat: WorkerHeartbeat,
        streams: SyncStreamsClient | None = None,
        flusher: StreamFlusher | None = None,
    ) -> None:
        self._engine = engine
        self._client = client
        self._streams = client if streams is None else streams
        self._flusher = flusher
        self._settings = settings
        self._heartbeat = heartbeat
        self.metrics = JobMetrics(client, after_write=heartbeat.beat)
        #: Set when the process is stopping: a job claimed after this is left in
        #: ModelQ's custody (never started), so another worker takes it over.
        self.draining = threading.Event()
        self._never = threading.Event()

    def run(self, job: CompletionJob) -> dict[str, Any]:
        if self.draining.is_set():
            log.info("job=%s claimed while draining; leaving it for another worker", job.job_id)
            self._never.wait()  # the process exits around us; ModelQ requeues the job
        writer = EventWriter(
            self._streams,
            job.job_id,
            owner=f"{self._heartbeat.info.worker_id}/{uuid.uuid4().hex[:8]}",
            ttl=self._settings.job_ttl,
            maxlen=stream_maxlen(self._settings),
            grace=self._settings.redis_grace_seconds,
            flusher=self._flusher,
        )
        self._heartbeat.job_started()
        timings = JobTimings(enqueued_at=job.enqueued_at or time.time())
        try:
            try:
                result = self._generate(job, writer, timings)
            except PromptTooLongError as exc:
                result = self._fail(job, writer, error_data(ErrorType.PROMPT_TOO_LONG, str(exc)))
            except GrammarError as exc:  # a schema this engine cannot enforce
                # Not the message: llguidance's may quote the schema.
                log.warning("job=%s response_format refused by the engine", job.job_id)
                result = self._fail(
                    job, writer, error_data(ErrorType.INVALID_RESPONSE_FORMAT, str(exc))
                )
            except ToolError as exc:  # tools this engine cannot offer
                result = self._fail(job, writer, error_data(ErrorType.INVALID_TOOLS, str(exc)))
            except LogprobsError as exc:  # logprobs this engine cannot give
                result = self._fail(job, writer, error_data(ErrorType.INVALID_LOGPROBS, str(exc)))
            except REDIS_ERRORS as exc:
                # The stream was unreachable for longer than REDIS_GRACE_SECONDS: its
                # readers have ended with `redis_unavailable` already. The job ends so too,
                # once Redis is back, with what it generated before (nothing after a gap).
                log.error("job=%s lost Redis while generating: %s", job.job_id, brief(exc))
                result = self._end_after_outage(job, writer)
            except Exception as exc:  # e.g. out of memory: end this job, keep serving
                log.exception("job=%s generation failed", job.job_id)
                message = f"{type(exc).__name__}: {exc}"
                result = self._fail(job, writer, error_data(ErrorType.GENERATION_FAILED, message))
            self._record(timings, result)
        finally:
            # After the figures: a draining worker waits for busy == 0, then writes
            # what is gathered and leaves.
            self._heartbeat.job_finished()
        return result

    def _record(self, timings: JobTimings, result: dict[str, Any]) -> None:
        """Publish the job's figures if it ended here (not skipped or handed over)."""
        if result["status"] not in ("done", "error"):
            return
        if len(timings.token_times) > 1:
            span = timings.token_times[-1] - timings.token_times[0]
            self._heartbeat.info.last_tokens_per_s = (
                round((len(timings.token_times) - 1) / span, 2) if span else 0.0
            )
        self._heartbeat.info.peak_batch = self._engine.peak_batch
        self.metrics.add(timings, result["status"] == "done", self._engine.name)

    def _fail(
        self, job: CompletionJob, writer: EventWriter, data: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            writer.write(EventType.ERROR, data)
        except REDIS_ERRORS as exc:
            log.error("job=%s could not publish its error yet: %s", job.job_id, brief(exc))
            self._publish_when_back(job, writer)
        return {"status": "error", "error": data["error"]["type"]}

    def _end_after_outage(self, job: CompletionJob, writer: EventWriter) -> dict[str, Any]:
        """Publish the tokens that could not be sent and a `redis_unavailable` error
        (unless the job's own end is among them) once the job's Redis answers again:
        left without an end, the job would read as running, taken over by no one,
        until JOB_TIMEOUT."""
        if not writer.has_pending_end():
            writer.enqueue(
                EventType.ERROR,
                error_data(
                    ErrorType.REDIS_UNAVAILABLE, "Redis was unreachable; the job was stopped"
                ),
            )
        self._publish_when_back(job, writer)
        return {"status": "error", "error": ErrorType.REDIS_UNAVAILABLE}

    def _publish_when_back(self, job: CompletionJob, writer: EventWriter) -> None:
        """Send what the writer holds (given back by a send that failed), retrying
        until Redis answers, the job's deadline passes, or the worker stops."""
        while True:
            writer.recover()
            try:
                writer.flush()
                log.warning("job=%s: its events reached Redis after the outage", job.job_id)
                return
            except REDIS_ERRORS as exc:
                if job.expired(time.time()) or self.draining.is_set():
                    log.error("job=%s could not publish its end: %s", job.job_id, brief(exc))
                    return
                time.sleep(1.0)

    def _start(
        self, job: CompletionJob, writer: EventWriter, history: list[JobEvent], published: int
    ) -> bool:
        """Claim the job (`started`, or `resumed` after a takeover, after `published`
        tokens); False if it may not go on (cancelled, or no longer ours)."""
        resumed = any(e.event in (EventType.STARTED, EventType.RESUMED) for e in history)
        data: dict[str, Any] = {"worker": self._heartbeat.info.worker_id}
        if resumed:
            data["completion_tokens"] = published
            log.warning("job=%s taken over after %d tokens", job.job_id, published)
        else:
            data["queue_seconds"] = (
                round(time.time() - job.enqueued_at, 4) if job.enqueued_at else None
            )
        writer.write(EventType.RESUMED if resumed else EventType.STARTED, data, claim=True)
        return not (writer.cancel_requested or writer.lost_job)

    def _generate(
        self, job: CompletionJob, writer: EventWriter, timings: JobTimings
    ) -> dict[str, Any]:
        history = writer.history()
        # A job that never ran costs its caller's share nothing (fairness.py): the
        # estimate this claim charged is taken back. (One that ran elsewhere was
        # settled, or keeps its estimate, there.)
        started = any(e.event in (EventType.STARTED, EventType.RESUMED) for e in history)
        unused = {} if started else {"usage": NOTHING_USED}
        if any(event.terminal for event in history):
            return {"status": "skipped", **unused}  # cancelled or timed out before it ran
        now = time.time()
        if job.expired(now):
            return {**self._fail(job, writer, TIMEOUT), **unused}
        if not started and job.waited_too_long(now):
            return {**self._fail(job, writer, QUEUE_TIMEOUT), **unused}
        return self._run(job, writer, timings, history)

    def _should_stop(self, job: CompletionJob, writer: EventWriter) -> Callable[[], bool]:
        return lambda: writer.should_stop or job.expired(time.time())

    def _run(
        self, job: CompletionJob, writer: EventWriter, timings: JobTimings, history: list[JobEvent]
    ) -> dict[str, Any]:
        """Generate the job, or the rest of it after what earlier attempts published."""
        started = time.perf_counter()
        tokens = [event for event in history if event.event == EventType.TOKEN]
        published = Published(
            ids=[i for event in tokens for i in event.token_ids],
            text="".join(event.data["text"] for event in tokens),
            events=len(tokens),
        )
        generation = generate(self._engine, job, published)
        if not self._start(job, writer, history, generation.generated):
            return self._stopped_at_start(job, writer)
        decoder = generation.decoder
        publisher = TokenPublisher(
            writer,
            IncrementalDetokenizer(decoder, initial_ids=published.ids)
            if decoder is not None
            else None,
            StopMatcher(job.params.stop),
            generation.skip_chars,
            on_token=timings.token,
            max_chars=self._settings.max_output_chars,
            delivered=len(published.text),
        )
        remaining = job.params.max_new_tokens - generation.generated
        params = job.params.model_copy(update={"max_new_tokens": max(remaining, 1)})
        finish_reason: str | None = "length" if remaining <= 0 else None
        counted: dict[str, int] | None = None
        pieces = generation.pieces(params, self._should_stop(job, writer))
        try:
            for piece in pieces if remaining > 0 and not publisher.capped else ():
                publisher.add(piece)
                counted = piece.usage or counted
                finish_reason = (
                    "stop" if publisher.stopped else piece.finish_reason or finish_reason
                )
                if publisher.stopped or publisher.capped:
                    break
        except UpstreamError as exc:
            # Not the message: it carries the upstream's error body, which may quote
            # the prompt (the client gets it; the log gets the kind and status).
            cause = exc.__cause__ or exc
            status = getattr(cause, "status_code", "")
            log.warning("job=%s upstream failed: %s %s", job.job_id, type(cause).__name__, status)
            return self._fail(job, writer, error_data(ErrorType.UPSTREAM_ERROR, str(exc)[:500]))
        finally:
            pieces.close()  # frees a batch slot, or closes the upstream's stream, now
        usage = generation.usage(publisher.ids, publisher.pieces, counted)
        return self._finish(job, writer, publisher, finish_reason, usage, timings, started)

    def _stopped_at_start(self, job: CompletionJob, writer: EventWriter) -> dict[str, Any]:
        if writer.cancel_requested:
            return self._fail(job, writer, CANCELLED)
        return {"status": writer.outcome.value}

    def _finish(
        self,
        job: CompletionJob,
        writer: EventWriter,
        publisher: TokenPublisher,
        finish_reason: str | None,
        usage: dict[str, int],
        timings: JobTimings,
        started: float,
    ) -> dict[str, Any]:
        """End the job as its generation ended: done, cancelled, taken away, timed out."""
        if finish_reason is not None and not writer.should_stop:
            publisher.flush()
        if publisher.capped and not publisher.stopped:
            # MAX_OUTPUT_CHARS: cut as max_new_tokens cuts (the text so far is whole).
            log.warning("job=%s cut at MAX_OUTPUT_CHARS", job.job_id)
            finish_reason = "length"
        if writer.lost_job:
            log.warning("job=%s stopped: %s", job.job_id, writer.outcome.value)
            return {"status": writer.outcome.value}
        # A job stopped early is charged what it used (its caller's share, its
        # TOKEN_RATE_LIMIT reservation: worker/queue.WorkerModelQ._settle_charge).
        if writer.cancel_requested:
            log.info("job=%s cancelled after %d tokens", job.job_id, usage["completion_tokens"])
            return {**self._fail(job, writer, CANCELLED), "usage": usage}
        if finish_reason is None:  # stopped between steps: the deadline passed
            return {**self._fail(job, writer, TIMEOUT), "usage": usage}
        timings.prompt_tokens = usage["prompt_tokens"]
        timings.completion_tokens = usage["completion_tokens"]
        data = {"finish_reason": finish_reason, "model": self._engine.name, "usage": usage}
        if writer.write(EventType.DONE, data) is WriteOutcome.CANCEL:
            # A cancel came first: the script wrote neither the last tokens nor `done`.
            log.info("job=%s cancelled at its end", job.job_id)
            return {**self._fail(job, writer, CANCELLED), "usage": usage}
        seconds = time.perf_counter() - started
        self._log_done(job, finish_reason, usage, seconds, publisher.released)
        return {"status": "done", "finish_reason": finish_reason, "usage": usage}

    def _log_done(
        self, job: CompletionJob, finish: str, usage: dict[str, int], seconds: float, text: str
    ) -> None:
        log.info(
            "job=%s done finish=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f "
            "tokens_per_s=%.1f prompt=%s completion=%s",
            job.job_id,
            finish,
            usage["prompt_tokens"],
            usage["completion_tokens"],
            seconds,
            usage["completion_tokens"] / seconds if seconds else 0.0,
            redact(job.prompt),
            redact(text),
        )
