"""The API's copy of the served model's tokenizer (never the model), to refuse a
prompt longer than the context window before it is queued (422, or OpenAI's 400
`context_length_exceeded` under /v1), as vLLM's API server does.

Workers advertise the model they loaded (registry.WorkerInfo.model_source). A
background task loads each newly seen source's tokenizer off the event loop. Until
one is loaded, or if it cannot be (a path that exists only on the worker's host),
requests are not checked here and the worker refuses the prompt instead, with a
`prompt_too_long` error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from textstream.engines.transformers import model_cache
from textstream.job import PromptFormat
from textstream.prompts import encode_chat, encode_prompt
from textstream.registry import WorkerInfo, live_workers
from textstream.sources import ModelSource, has_local_tokenizer, hub_reachable

log = logging.getLogger(__name__)


def load_tokenizer(spec: str, cache_dir: str = "") -> Any:
    from transformers import AutoTokenizer  # heavy: imported only here, in a thread

    source = ModelSource.parse(spec)
    copy = None
    if source.gguf_file and cache_dir and source.is_local:
        # A worker on this host has converted the GGUF (model_cache.py): its copy
        # holds the same tokenizer as tokenizer.json, loaded in about a second.
        # Rebuilt from the GGUF vocabulary instead it takes ~20 s of a core, taken
        # from the workers streaming beside this process.
        with contextlib.suppress(OSError):  # a file gone since: read what is there
            copy = model_cache.find(Path(source.path) / source.gguf_file, cache_dir)
        if copy is not None:
            return AutoTokenizer.from_pretrained(copy)
    kwargs: dict[str, Any] = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not source.is_local and not hub_reachable():
        kwargs["local_files_only"] = True
    return AutoTokenizer.from_pretrained(source.path, **kwargs)


async def in_daemon_thread(work: Callable[[], Any]) -> Any:
    """`work()` in a thread of its own that does not hold the process's exit.

    asyncio.to_thread's executor is joined when the loop closes (and again at
    interpreter exit): a tokenizer still loading (importing transformers alone takes
    seconds on a busy host) would keep a stopping API process alive that long."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(value)
        else:
            done.set_exception(error)

    def run() -> None:
        value, error = None, None
        try:
            value = work()
        except BaseException as exc:  # handed to the awaiting task, as to_thread does
            error = exc
        # RuntimeError: the loop is closed (the process is stopping; nobody waits).
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name="load-tokenizer", daemon=True).start()
    return await done


class PromptTokens:
    """Counts prompt tokens with the tokenizer of each model live workers serve."""

    def __init__(self, cache_dir: str = "") -> None:
        #: MODEL_CACHE_DIR: where a worker on this host keeps converted GGUF models.
        self._cache_dir = cache_dir
        self._tokenizers: dict[str, Any] = {}
        self._failed: set[str] = set()
        self._workers: dict[str, WorkerInfo] = {}  # model -> a live worker serving it
        self._mixed: set[tuple[str, ...]] = set()  # names already warned about

    async def watch(self, client: aioredis.Redis, interval: float) -> None:
        """Run for the app's lifetime: notice served models, load their tokenizers."""
        while True:
            try:
                workers = await live_workers(client)
                self._workers = {w.model: w for w in reversed(workers)}
                self._warn_of_mixed_sources(workers)
                for worker in self._workers.values():
                    source = worker.model_source
                    # The fake engine has no tokenizer; an upstream's is its own.
                    if not has_local_tokenizer(source):
                        continue
                    if source not in self._tokenizers and source not in self._failed:
                        await self._load(source)
            except RedisError:
                pass  # /health reports Redis; try again next round
            await asyncio.sleep(max(interval, 1.0))

    def _warn_of_mixed_sources(self, workers: list[WorkerInfo]) -> None:
        """Workers serving different models under one name (SERVED_MODEL_NAME set
        alike by mistake) answer one request one way and the next another: logged
        once per such set, since nothing else shows it."""
        sources: dict[str, set[str]] = {}
        for worker in workers:
            sources.setdefault(worker.model, set()).add(worker.model_source)
        for model, found in sources.items():
            mixed = (model, *sorted(found))
            if len(found) > 1 and mixed not in self._mixed:
                self._mixed.add(mixed)
                log.warning(
                    "workers serve different models under the name %r: %s",
                    model,
                    ", ".join(sorted(found)),
                )

    async def _load(self, source: str) -> None:
        try:
            self._tokenizers[source] = await in_daemon_thread(
                lambda: load_tokenizer(source, self._cache_dir)
            )
            log.info("loaded the tokenizer of %s to check prompt lengths", source)
        except Exception as exc:
            self._failed.add(source)
            log.warning("cannot load the tokenizer of %s (%s); workers will check", source, exc)

    def cannot_load(self, model: str) -> bool:
        """The model's workers have no tokenizer this process can load: an upstream
        engine or the fake one, or one that failed to load here (for good)."""
        worker = self._workers.get(model)
        if worker is None:
            return False
        return not has_local_tokenizer(worker.model_source) or worker.model_source in self._failed

    def largest_counted_window(self) -> int:
        """The largest context window live workers serve whose tokens are counted
        here or by the worker (0 before one is seen). An upstream engine's and the
        fake engine's are left out: they are not counted (nor always known: an
        upstream that does not say is assumed a window of 2**20)."""
        windows = (
            w.context_length or 0
            for w in self._workers.values()
            if has_local_tokenizer(w.model_source)
        )
        return max(windows, default=0)

    def current(self, model: str) -> tuple[Any, WorkerInfo] | None:
        """The model's tokenizer and a worker serving it, once the tokenizer is
        loaded (None before, or when it cannot be: a fake engine, an upstream, a
        path only the worker's host has)."""
        worker = self._workers.get(model)
        tokenizer = self._tokenizers.get(worker.model_source) if worker else None
        return None if worker is None or tokenizer is None else (tokenizer, worker)

    async def count(
        self,
        model: str,
        prompt: str,
        prompt_format: PromptFormat,
        messages: list[dict[str, Any]] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[int, int] | None:
        """(prompt tokens, context window), or None when no tokenizer is available."""
        current = self.current(model)
        if current is None or not current[1].context_length:
            return None
        tokenizer, worker = current
        default: Any = worker.prompt_format
        if messages is not None:
            ids = await asyncio.to_thread(encode_chat, tokenizer, messages, False, tools)
        else:
            ids = await asyncio.to_thread(encode_prompt, tokenizer, prompt, prompt_format, default)
        return len(ids), worker.context_length
