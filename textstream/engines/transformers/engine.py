"""The built-in engine: a Hugging Face causal LM and a decode loop of our own.

The decode loop is written out (nanoGPT style) rather than calling
`model.generate` in a thread: one step per iteration gives the caller a place to
stop (cancellation, deadlines) between any two tokens, and no thread hand-off sits
between a token and its publication. `start_batching()` switches generate() to a
shared continuous batch (batching.py): one forward pass per step for every running
request. Both loops run the same forward passes (passes.py: chunked prefill, a
decode step that may be compiled) on the same kind of preallocated KV cache
(kvcache.py), so a request alone is a batch of one; sampling (sampling.py) is
the same in both. A model whose cache cannot live in slots (sliding-window or
recurrent layers) gets transformers' own cache, one request at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from textstream.engines.transformers.batching import Batcher
from textstream.engines.transformers.constraints import Grammars
from textstream.engines.transformers.passes import Passes, supports_slots
from textstream.engines.transformers.sampling import Sequence, start_sequence
from textstream.job import PromptFormat, SamplingParams, Step
from textstream.prompts import encode_chat, encode_prompt

log = logging.getLogger(__name__)


class TransformersEngine:
    """A loaded model and tokenizer (an `engines.base.Engine`)."""

    def __init__(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        device: torch.device,
        prompt_format: PromptFormat = "auto",
        load_seconds: float = 0.0,
        source: str = "",
        prefill_chunk_tokens: int = 256,
        compile_decode: str = "off",
        compact_pass: bool = True,
        batch_invariant: bool = False,
    ) -> None:
        self.model = model
        self.source = source
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.prompt_format = prompt_format
        self.load_seconds = load_seconds
        config = model.config
        window = getattr(config, "n_positions", None) or getattr(
            config, "max_position_embeddings", None
        )
        self.context_length = int(window or 2048)
        self.stop_ids = self._stop_ids(model, tokenizer)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.compile_decode = compile_decode
        self.passes = (
            Passes(
                model,
                device,
                self.context_length,
                compact=compact_pass,
                batch_invariant=batch_invariant,
            )
            if supports_slots(model)
            else None
        )
        self.batcher: Batcher | None = None
        #: Compiled output grammars (structured outputs), by schema.
        self.grammars = Grammars(tokenizer)

    def warm_up(self) -> None:
        """One short generation, so the first request does not pay for first-call
        set-up (thread pools, kernel selection); then start compiling the decode
        step if COMPILE asks for it (passes.py)."""
        params = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
        for _ in self.generate([self.tokenizer.eos_token_id or 0] * 4, params):
            pass
        if self.passes is not None and self.compile_decode != "off":
            if self.passes.batch_invariant:
                log.warning(
                    "BATCH_INVARIANT holds for prefill only with COMPILE=%s: a compiled "
                    "decode step attends the batch in one call",
                    self.compile_decode,
                )
            self.passes.compile_decode(background=self.compile_decode == "background")

    def start_batching(self) -> bool:
        """Serve concurrent generate() calls from one running batch (batching.py).

        Returns False, and stays one-request-at-a-time, for a model whose KV cache
        cannot live in slots (sliding-window or recurrent layers)."""
        if self.passes is None:
            log.warning("model %s cannot be batched here; serving one request at a time", self.name)
            return False
        self.batcher = Batcher(self.passes, self.prefill_chunk_tokens)
        return True

    @property
    def peak_batch(self) -> int:
        return self.batcher.peak if self.batcher is not None else 0

    @staticmethod
    def _stop_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
        ids: set[int] = set()
        for value in (
            getattr(model.generation_config, "eos_token_id", None),
            tokenizer.eos_token_id,
        ):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return frozenset(ids)

    # -- prompts ------------------------------------------------------------------

    def encode_prompt(self, prompt: str, prompt_format: PromptFormat = "auto") -> list[int]:
        return encode_prompt(self.tokenizer, prompt, prompt_format, self.prompt_format)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        continue_final: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        return encode_chat(self.tokenizer, messages, continue_final, tools)

    def decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    # -- generation ---------------------------------------------------------------

    def start(self, prompt_ids: list[int], params: SamplingParams, generated: int) -> Sequence:
        """One request's decode state, checked against the context window; with its
        own grammar matcher when its output must match a schema (GrammarError if
        the schema cannot be compiled for this tokenizer)."""
        if len(prompt_ids) <= generated:  # an empty prompt: end-of-text stands in
            prompt_ids = [self.tokenizer.eos_token_id or 0, *prompt_ids]
        matcher = self.grammars.matcher(params.json_schema) if params.json_schema else None
        return start_sequence(
            prompt_ids,
            params,
            generated,
            context_length=self.context_length,
            stop_ids=self.stop_ids,
            device=self.device,
            matcher=matcher,
        )

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
        generated: int = 0,
    ) -> Generator[Step]:
        """Yield generated token ids one at a time (the contract: engines/base.py)."""
        sequence = self.start(prompt_ids, params, generated)
        if self.batcher is not None:
            return self.batcher.generate(sequence, should_stop)
        loop = self._generate_alone if self.passes is not None else self._generate_plain
        alone: Generator[Step] = loop(sequence, should_stop)
        return alone

    @torch.inference_mode()  # type: ignore[untyped-decorator]  # torch wraps generators per step
    def _generate_alone(
        self, sequence: Sequence, should_stop: Callable[[], bool]
    ) -> Generator[Step]:
        """The one-request decode loop: a batch of one, without the batcher thread."""
        assert self.passes is not None
        ids, chunk = sequence.prompt_ids, max(1, self.prefill_chunk_tokens)
        cache = self.passes.new_cache(1, len(ids) + 1)
        # A job taken over: the prompt as it was prefilled, then the tokens another
        # worker published as its decode steps computed them (Passes.replay).
        prompt = sequence.prompt_length
        for start in range(0, prompt, chunk):
            logits = self.passes.prefill(cache, [ids[start : min(start + chunk, prompt)]], [start])
        if prompt < len(ids):
            logits = self.passes.replay(cache, ids[prompt:], prompt, chunk)
        length = len(ids)
        for produced in range(1, sequence.budget + 1):
            step = sequence.step(sequence.choose(logits[0]), produced)  # logits: (1, V)
            yield step
            token, finish = step.token_id, step.finish_reason
            if finish is not None or should_stop():
                return
            logits = self.passes.decode(cache, [token], [length])
            length += 1

    @torch.inference_mode()  # type: ignore[untyped-decorator]  # torch wraps generators per step
    def _generate_plain(
        self, sequence: Sequence, should_stop: Callable[[], bool]
    ) -> Generator[Step]:
        """transformers' own KV cache, for models the slot cache cannot hold."""
        input_ids = torch.tensor([sequence.prompt_ids], device=self.device)  # (1, T)
        past = None
        for produced in range(1, sequence.budget + 1):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            step = sequence.step(sequence.choose(out.logits[0, -1, :]), produced)  # (1, T, V)
            yield step
            token, finish = step.token_id, step.finish_reason
            if finish is not None or should_stop():
                return
            input_ids = torch.tensor([[token]], device=self.device)  # (1, 1)
