"""Continuous batching: one worker process serves many streams from one model copy.

Each of the worker's ModelQ threads (its `--concurrency`, the batch slots) still
runs one job and iterates `engine.generate()`, but with batching on that call
hands the request to the `Batcher`'s own thread and reads its tokens back from a
queue. The batcher thread runs every request's forward passes (passes.py):

    loop:
        drop requests whose reader left (cancelled, stop string, deadline)
        prefill: the waiting prompts, together, one chunk each (one pass)
        decode: one pass for every running request, one new token each
        hand each token to its request's queue; drop the ones that finished

Prefill. Requests that arrive together are prefilled together: the prompts
waiting at a step form a group, padded into one forward pass, as many as fit
PREFILL_CHUNK_TOKENS (rows x padded length). A longer prompt goes in chunks of
that many tokens, one chunk per loop, so the running streams get a token between
any two chunks instead of waiting for a whole long prefill. A request whose last
chunk is done samples its first token and moves to the decode batch; prompts
that arrive meanwhile form the next group.

Each request's KV cache is one row of a `SlotCache` (kvcache.py): the prefill
group's, then the decode batch's (its row is copied over once). Rows need no
alignment, since each has its own positions and mask row, so a request's logits
are the same as when it runs alone, up to float rounding. A request that leaves
frees its row; the batch's last row moves into its place.

Requests join and leave between any two steps; each keeps its own sampling
parameters, random generator, penalty history, token budget and stop ids
(sampling.py's `Sequence`, the same as the one-request loop's). One request's
failure ends that request alone (`_isolated`): its sampling, or its prefill, whose
group is then prefilled again one request at a time.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch

from textstream.engines.transformers.kvcache import SlotCache
from textstream.engines.transformers.passes import Passes
from textstream.engines.transformers.sampling import Sequence
from textstream.job import Step

#: How often a reader waiting for its row's next token looks at should_stop().
STOP_CHECK_SECONDS = 0.1

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    sequence: Sequence
    #: Steps for the reader; an exception if the batch failed.
    out: queue.SimpleQueue[Step | BaseException] = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    #: Tokens of this request in its cache row (its next position id).
    length: int = 0
    last_token: int = 0
    finished: bool = False
    #: Set by the reader: it stopped reading (cancel, stop string, deadline).
    left: bool = False
    #: Prefilled alone: its group's batched prefill failed once.
    solo: bool = False

    @property
    def gone(self) -> bool:
        return self.finished or self.left


#: How long an idle batcher waits after a first arrival for the rest of a burst.
GATHER_S = 0.002


class Batcher:
    """The running batch of one model, driven by a daemon thread of its own."""

    def __init__(self, passes: Passes, prefill_tokens: int, gather_s: float = GATHER_S) -> None:
        self._passes = passes
        self.gather_s = gather_s
        self._prefill_tokens = max(1, prefill_tokens)
        self._arrived: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._waiting: deque[_Request] = deque()
        #: The prefill group: row i of `_group_cache` is `_group[i]`'s.
        self._group: list[_Request] = []
        self._group_cache: SlotCache = passes.new_cache()
        #: The decode batch: row i of `_cache` is `_running[i]`'s.
        self._running: list[_Request] = []
        self._cache: SlotCache = passes.new_cache()
        #: Most requests ever decoded in one step (reported in /workers).
        self.peak = 0
        self.steps = 0
        threading.Thread(target=self._loop, name="batcher", daemon=True).start()

    # -- the reader's side (a ModelQ thread) --------------------------------------

    def generate(self, sequence: Sequence, should_stop: Callable[[], bool]) -> Generator[Step]:
        """Engine.generate's contract, served by the batch. Nothing is submitted
        until the first token is asked for."""
        request = _Request(sequence)
        with self._wake:
            self._arrived.append(request)
            self._wake.notify()
        try:
            while True:
                try:
                    # Not a bare get(): behind other rows' long prefill, a cancel or
                    # the deadline must be seen before this row's next token.
                    item = request.out.get(timeout=STOP_CHECK_SECONDS)
                except queue.Empty:
                    if should_stop():
                        return
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None or should_stop():
                    return
        finally:
            request.left = True  # the batcher drops it before its next step

    # -- the batcher thread -------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                if not (self._arrived or self._waiting or self._group or self._running):
                    while not self._arrived:
                        self._wake.wait()
                    # Idle until now: requests that arrive together (a burst, a
                    # client's parallel calls) reach this thread one by one over a
                    # millisecond or so. Prefilling the first alone would make the
                    # others wait for its pass and then for their own; gathering
                    # them first prefills them in one pass.
                    deadline = time.monotonic() + self.gather_s
                    while (left := deadline - time.monotonic()) > 0:
                        self._wake.wait(left)
                self._waiting.extend(self._arrived)
                self._arrived.clear()
            with torch.inference_mode():
                self._running = _compact(self._cache, self._running)
                self._group = _compact(self._group_cache, self._group)
                if not self._group:
                    self._form_group()
                if self._group:
                    self._prefill_chunk()
                try:
                    self._decode()
                except Exception as exc:  # e.g. out of memory: the whole step failed
                    log.exception(
                        "batched decode step failed for %d request(s)", len(self._running)
                    )
                    for request in self._running:
                        request.out.put(exc)
                    self._running, self._cache = [], self._passes.new_cache()

    def _isolated(self, request: _Request, work: Callable[[_Request], None], what: str) -> None:
        """Run one request's own work (its prefill, its sampling): if it fails, that
        request alone ends with the error and its batch-mates go on untouched."""
        try:
            work(request)
        except Exception as exc:
            log.warning("%s failed for one request of the batch: %s", what, type(exc).__name__)
            request.out.put(exc)
            request.finished = True  # dropped before the next step, with its cache row

    def _emit(self, request: _Request, logits: torch.Tensor) -> None:
        """Choose `request`'s next token from its logits (V,) and hand it over."""
        self._isolated(request, lambda r: self._hand_over(r, r.sequence.choose(logits)), "sampling")

    def _hand_over(self, request: _Request, token: int) -> None:
        request.produced += 1
        step = request.sequence.step(token, request.produced)
        request.out.put(step)
        request.last_token, request.finished = token, step.finish_reason is not None

    # -- prefill ------------------------------------------------------------------

    def _form_group(self) -> None:
        """Take waiting requests, in arrival order, while their first chunks fit
        PREFILL_CHUNK_TOKENS padded together (at least one). A request whose
        group failed before is prefilled alone."""
        budget, width = self._prefill_tokens, 0
        group: list[_Request] = []
        while self._waiting:
            request = self._waiting[0]
            if request.left:
                self._waiting.popleft()
                continue
            grown = max(width, min(request.sequence.prompt_length, budget))
            if group and (_alone(request) or _alone(group[0]) or (len(group) + 1) * grown > budget):
                break
            group.append(self._waiting.popleft())
            width = grown
        if not group:
            return
        longest = max(len(r.sequence.prompt_ids) for r in group)
        self._group_cache.reserve(len(group), longest)
        for row, request in enumerate(group):
            request.length = 0
            self._group_cache.clear(row)  # stale values of an earlier group
        self._group = group

    def _prefill_chunk(self) -> None:
        """One pass for the group: each row's next chunk (they all advance together).
        Rows whose prompt is done sample their first token and join the batch.

        A job taken over (alone in its group) has its prompt prefilled, then the
        tokens another worker published replayed with a decode step's numbers
        (Passes.replay), so that its next token is the one that worker would have
        chosen: a chunk a loop as well, so that a job taken over after thousands
        of tokens holds the running streams no longer than a prompt's chunk does."""
        group, offset = self._group, self._group[0].length
        first = group[0].sequence
        if first.generated and offset >= first.prompt_length:  # replaying, alone
            chunks = [first.prompt_ids[offset : offset + self._prefill_tokens]]
            run = functools.partial(
                self._passes.replay, self._group_cache, chunks[0], offset, self._prefill_tokens
            )
        else:
            remaining = max(r.sequence.prompt_length for r in group) - offset
            size = min(remaining, max(1, self._prefill_tokens // len(group)))
            chunks = [
                r.sequence.prompt_ids[offset : min(offset + size, r.sequence.prompt_length)]
                for r in group
            ]
            run = functools.partial(
                self._passes.prefill, self._group_cache, chunks, [offset] * len(group)
            )
        try:
            logits = run()
        except Exception as exc:
            self._prefill_failed(exc)
            return
        done: set[int] = set()
        for row, (request, chunk) in enumerate(zip(group, chunks, strict=True)):
            request.length = offset + len(chunk)
            # Its whole prompt: a job taken over's, with the published tokens.
            if request.left or request.length < len(request.sequence.prompt_ids):
                continue
            done.add(row)
            self._emit(request, logits[row])
            if not request.finished:
                self._cache.take(self._group_cache, row, len(self._running), request.length)
                self._running.append(request)
        self._group = _compact(self._group_cache, group, lambda row, r: row in done or r.gone)

    def _prefill_failed(self, exc: Exception) -> None:
        """A group's pass raised: a lone request ends with the error; a group goes
        back to the front of the queue, each to be prefilled alone, so that only the
        request that fails ends."""
        group, self._group = self._group, []
        if len(group) == 1:
            log.warning("prefill failed for one request: %s", type(exc).__name__)
            group[0].out.put(exc)
            group[0].finished = True
            return
        log.warning("prefill of %d requests failed (%s); again one at a time", len(group), exc)
        for request in reversed(group):
            request.solo = True
            self._waiting.appendleft(request)

    # -- decode -------------------------------------------------------------------

    def _decode(self) -> None:
        """One forward pass for every running request: (B, 1) in, (B, V) out."""
        running = self._running = _compact(self._cache, self._running)
        if not running:
            return
        logits = self._passes.decode(
            self._cache, [r.last_token for r in running], [r.length for r in running]
        )
        self.peak, self.steps = max(self.peak, len(running)), self.steps + 1
        # Plain greedy rows (the common case) share one argmax and one device sync.
        plain = [i for i, r in enumerate(running) if r.sequence.plain_greedy]
        greedy = dict(zip(plain, logits[plain].argmax(dim=-1).tolist(), strict=True))
        for i, request in enumerate(running):
            request.length += 1
            if i in greedy:
                self._hand_over(request, greedy[i])
            else:
                self._emit(request, logits[i])


def _alone(request: _Request) -> bool:
    """Prefilled in a group of its own: its group's prefill failed once, or it is a
    job taken over (its replay runs on row 0 of a one-row group)."""
    return request.solo or request.sequence.generated > 0


def _compact(
    cache: SlotCache,
    rows: list[_Request],
    drop: Callable[[int, _Request], bool] = lambda row, request: request.gone,
) -> list[_Request]:
    """Drop the rows `drop` names (by default finished and abandoned requests); the
    last rows move into their places."""
    dropped = [drop(row, request) for row, request in enumerate(rows)]
    kept = len(rows) - sum(dropped)
    if kept == len(rows):
        return rows
    holes = [row for row in range(kept) if dropped[row]]
    movers = [row for row in range(kept, len(rows)) if not dropped[row]]
    for hole, mover in zip(holes, movers, strict=True):
        cache.move(mover, hole)
        rows[hole] = rows[mover]
    return rows[:kept]
