"""Continuous batching: one worker process serves many streams from one model copy.

Each of the worker's ModelQ threads (its `--concurrency`, the batch slots) still
runs one job and iterates `engine.generate()`, but with batching on that call
hands the request to the `Batcher`'s own thread and reads its tokens back from a
queue. The batcher thread runs the decode loop for every running request at once:

    loop:
        drop requests whose reader left (cancelled, stop string, deadline)
        prefill each request that arrived (alone: B=1), sample its first token,
        and merge its KV cache into the batch's
        one forward pass for the whole batch, one new token per request
        hand each token to its request's queue; drop the ones that finished

Requests join and leave between any two steps; each keeps its own sampling
parameters, random generator, penalty history, token budget and stop ids.

The batch's KV cache is a plain transformers `DynamicCache` of shape
(B, heads, L, head_dim) per layer. Sequences of different lengths are aligned
to the right: a shorter one has zero keys on its left, masked out by the
attention mask (B, L), and each row gets its own position ids, so a request's
logits are the same as when it runs alone, up to float rounding. Left columns
that no remaining row uses are trimmed when requests leave.

Prefill is not chunked: a long prompt joining delays the running streams by its
prefill time. Prompts in this service are bounded by MAX_PROMPT_CHARS.

Sampling is sampling.py's, the same as the one-request loop's: the engine sets up
each request's `Sequence` and hands it here.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from textstream.engines.transformers.sampling import Sequence
from textstream.job import Step

log = logging.getLogger(__name__)


def supports_batching(model: Any, device: torch.device, probe_token: int) -> bool:
    """Only caches made of plain full-attention layers can be padded and merged."""
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[probe_token]], device=device), use_cache=True)
    cache = out.past_key_values
    return isinstance(cache, DynamicCache) and all(
        type(layer) is DynamicLayer for layer in cache.layers
    )


@dataclass(eq=False)
class _Request:
    sequence: Sequence
    #: Steps for the reader; an exception if the batch failed.
    out: queue.SimpleQueue[Step | BaseException] = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    #: Positions in the cache that hold this request's tokens (its next position id).
    length: int = 0
    last_token: int = 0
    finished: bool = False
    #: Set by the reader: it stopped reading (cancel, stop string, deadline).
    left: bool = False


class Batcher:
    """The running batch of one model, driven by a daemon thread of its own."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self._model = model
        self._device = device
        self._arrived: deque[_Request] = deque()
        self._wake = threading.Condition()
        self._running: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, L): 1 where a row has a token
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
                item = request.out.get()
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
                while not self._arrived and not self._running:
                    self._wake.wait()
                arrived = list(self._arrived)
                self._arrived.clear()
            with torch.inference_mode():
                self._drop_finished()
                for request in arrived:
                    if not request.left:
                        self._isolated(request, self._prefill, "prefill")
                try:
                    self._decode()
                except Exception as exc:  # e.g. out of memory: the whole step failed
                    log.exception(
                        "batched decode step failed for %d request(s)", len(self._running)
                    )
                    for request in self._running:
                        request.out.put(exc)
                    self._running, self._cache, self._mask = [], None, None

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
        finish = request.sequence.finish_reason(token, request.produced)
        request.out.put(Step(token, finish))
        request.last_token, request.finished = token, finish is not None

    def _prefill(self, request: _Request) -> None:
        """Run the prompt alone, emit its first token, and merge it into the batch."""
        ids = torch.tensor([request.sequence.prompt_ids], device=self._device)  # (1, T)
        out = self._model(input_ids=ids, use_cache=True)
        request.length = ids.shape[1]
        self._emit(request, out.logits[0, -1, :])
        if request.finished:
            return
        self._merge(out.past_key_values, request.length)
        self._running.append(request)

    def _merge(self, cache: DynamicCache, length: int) -> None:
        """Add one sequence's cache (1, H, length, D) per layer as the batch's last row,
        padding on the left whichever side is shorter."""
        ones = torch.ones((1, length), dtype=torch.long, device=self._device)
        if self._cache is None or self._mask is None:
            self._cache, self._mask = cache, ones
            return
        width = max(self._mask.shape[1], length)
        for layer, new in zip(self._cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(new.keys, width)])
            layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(new.values, width)])
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(ones, width)])

    def _decode(self) -> None:
        """One forward pass for every running request: (B, 1) in, (B, V) out."""
        running = self._running
        if not running or self._cache is None or self._mask is None:
            return
        device = self._device
        tokens = torch.tensor([[r.last_token] for r in running], device=device)
        positions = torch.tensor([[r.length] for r in running], device=device)
        self._mask = torch.cat(
            [self._mask, torch.ones((len(running), 1), dtype=torch.long, device=device)], dim=1
        )
        out = self._model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]  # (B, V)
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
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Remove finished and abandoned rows; trim left columns no row uses."""
        keep = [i for i, r in enumerate(self._running) if not (r.finished or r.left)]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep or self._cache is None or self._mask is None:
            self._running, self._cache, self._mask = [], None, None
            return
        rows = torch.tensor(keep, device=self._device)
        mask = self._mask.index_select(0, rows)
        start = int(mask.any(dim=0).nonzero()[0])  # first column some row still uses
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, rows)[:, :, start:, :]
            layer.values = layer.values.index_select(0, rows)[:, :, start:, :]


def _pad_left(tensor: torch.Tensor, width: int) -> Any:
    """Zero-pad dimension 2 (KV: (B, H, L, D)) or 1 (mask: (B, L)) on the left to `width`."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
