"""The model engine: load a Hugging Face causal LM and generate token ids one by one.

With batching.py, the only modules that import torch and transformers. The decode
loop is written out (nanoGPT style) rather than calling `model.generate` in a
thread: one step per iteration gives the caller a place to stop (cancellation,
deadlines) between any two tokens, and no thread hand-off sits between a token and
its publication. `start_batching()` switches generate() to a shared continuous
batch (batching.py): one forward pass per step for every running request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from textstream.config import Settings
from textstream.models import ModelLoadError, ModelSource, PromptTooLongError, hub_reachable
from textstream.prompts import encode_chat, encode_prompt
from textstream.schemas import PromptFormat, SamplingParams, Step

if TYPE_CHECKING:
    from textstream.batching import Batcher

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Engine:
    """A loaded model and tokenizer, generating for one request at a time."""

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
        self.batcher: Batcher | None = None

    def start_batching(self) -> bool:
        """Serve concurrent generate() calls from one running batch (batching.py).

        Returns False, and stays one-request-at-a-time, for a model whose KV cache
        cannot be padded and merged (sliding-window or recurrent layers)."""
        from textstream.batching import Batcher, supports_batching

        if not supports_batching(self):
            log.warning("model %s cannot be batched here; serving one request at a time", self.name)
            return False
        self.batcher = Batcher(self)
        return True

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

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def decode(self, ids: list[int]) -> str:
        return str(
            self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    # -- generation ---------------------------------------------------------------

    @staticmethod
    def _penalize(
        logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """logits, seen (bool), counts (int): all (vocab,). Penalties as OpenAI defines
        presence/frequency (generated tokens) and Hugging Face repetition (all seen)."""
        logits = logits.float()
        if params.repetition_penalty != 1.0:
            penalized = torch.where(
                logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
            )
            logits = torch.where(seen, penalized, logits)
        if params.frequency_penalty or params.presence_penalty:
            logits = logits - counts * params.frequency_penalty
            logits = logits - (counts > 0).float() * params.presence_penalty
        return logits

    def _seen_tokens(self, ids: torch.Tensor, generated: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(seen, counts), both (V,): every id so far, and how often each of the last
        `generated` (the completion's own) occurs."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        counts = torch.zeros(vocab, device=self.device)
        seen[ids] = True
        if generated:
            counts.index_add_(0, ids[-generated:], torch.ones(generated, device=self.device))
        return seen, counts

    def choose(
        self,
        logits: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
        history: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> int:
        """The next token from one sequence's logits (V,): penalties (when `history`
        is kept), then greedy or sampled; `history` then counts the new token."""
        if history is not None:
            logits = self._penalize(logits, params, *history)
        token = self._next_token(logits, params, generator)
        if history is not None:
            history[0][token] = True
            history[1][token] += 1
        return token

    def finish_reason(
        self, token: int, produced: int, budget: int, params: SamplingParams
    ) -> str | None:
        """Why a sequence ends at this token (its `produced`-th of `budget`), if it does."""
        if token in self.stop_ids and not params.ignore_eos:
            return "stop"
        return "length" if produced == budget else None

    def start(
        self, prompt_ids: list[int], params: SamplingParams, generated: int
    ) -> tuple[list[int], int, torch.Generator | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """Check a request against the context window; return (prompt ids, token
        budget, its random generator, its penalty history)."""
        if not prompt_ids:
            prompt_ids = [self.tokenizer.eos_token_id or 0]
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise PromptTooLongError(
                f"prompt is {len(prompt_ids)} tokens; the model's context window is "
                f"{self.context_length}"
            )
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # Kept only when a penalty asks for it: two vocabulary-sized updates per step.
        history = (
            self._seen_tokens(torch.tensor(prompt_ids, device=self.device), generated)
            if params.penalized
            else None
        )
        return prompt_ids, min(params.max_new_tokens, room), generator, history

    def _next_token(
        self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
    ) -> int:
        """logits: (vocab,) float. Greedy argmax, or temperature/top-k/top-p sampling."""
        if params.greedy:
            return int(torch.argmax(logits).item())
        logits = logits.float() / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p
            logits = logits.masked_fill(
                torch.zeros_like(drop).scatter(0, order, drop), float("-inf")
            )
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
        generated: int = 0,
    ) -> Generator[Step]:
        """Yield generated token ids one at a time.

        Stops on an end-of-sequence id (finish_reason "stop"), after
        `params.max_new_tokens` or at the context window ("length"), or as soon as
        `should_stop()` is true between two steps (the caller then knows why).
        The last `generated` ids of `prompt_ids` were generated earlier (a job taken
        over): presence and frequency penalties count them.
        """
        if self.batcher is not None:
            return self.batcher.generate(prompt_ids, params, should_stop, generated)
        alone: Generator[Step] = self._generate_alone(prompt_ids, params, should_stop, generated)
        return alone

    @torch.inference_mode()  # type: ignore[untyped-decorator]  # torch wraps generators per step
    def _generate_alone(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        should_stop: Callable[[], bool],
        generated: int,
    ) -> Generator[Step]:
        """The one-request KV-cached decode loop."""
        prompt_ids, budget, generator, history = self.start(prompt_ids, params, generated)
        input_ids = torch.tensor([prompt_ids], device=self.device)  # (1, T)
        past = None
        for produced in range(1, budget + 1):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = self.choose(out.logits[0, -1, :], params, generator, history)  # (1, T, V)
            finish = self.finish_reason(token, produced, budget, params)
            yield Step(token, finish)
            if finish is not None or should_stop():
                return
            input_ids = torch.tensor([[token]], device=self.device)  # (1, 1)


def _load_from(source: ModelSource, settings: Settings, online: bool) -> Engine:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if settings.torch_threads and device.type == "cpu":
        torch.set_num_threads(settings.torch_threads)
    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if not source.is_local and not online:
        kwargs["local_files_only"] = True  # use the local cache only; fail fast
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    return Engine(
        model,
        tokenizer,
        name=source.name,
        device=device,
        prompt_format=settings.prompt_format,
        load_seconds=time.perf_counter() - started,
        source=source.spec,
    )


def load_engine(settings: Settings) -> Engine:
    """Load MODEL_ID; if that fails and MODEL_FALLBACK is set, load it with a loud warning.

    Raises ModelLoadError (with both reasons) when nothing could be loaded.
    """
    specs = [settings.model_id] + ([settings.model_fallback] if settings.model_fallback else [])
    online: bool | None = None
    failures: list[str] = []
    for index, spec in enumerate(specs):
        try:
            source = ModelSource.parse(spec)
            if not source.is_local and online is None:
                online = hub_reachable()
            engine = _load_from(source, settings, bool(online))
        except Exception as exc:  # any loader failure: report it, try the fallback
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            failures.append(f"{spec!r} ({reason})")
            log.error("could not load model %r: %s", spec, reason)
            continue
        if index > 0:
            log.warning(
                "!!! MODEL_ID %r could not be loaded; serving the FALLBACK model %r instead !!!",
                settings.model_id,
                spec,
            )
        log.info("model %s loaded on %s in %.1fs", engine.name, engine.device, engine.load_seconds)
        return engine
    raise ModelLoadError("no model could be loaded: " + "; ".join(failures))
