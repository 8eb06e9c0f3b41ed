"""Choosing each next token for one request: penalties, then greedy or sampled.

A `Sequence` is one request's decode state: its sampling parameters, seeded random
generator, penalty history and token budget. The plain decode loop (engine.py) and
the continuous batch (batching.py) both hand it each step's logits, so a request
picks the same tokens whichever loop runs it.

Any valid parameters must give a token, however extreme the floats (1e-300,
5e-324): a temperature below GREEDY_BELOW is greedy (as vLLM does); penalized
logits are clamped to finite values; sampling divides logits shifted so that their
maximum is 0, so dividing by a tiny temperature gives -inf, never inf or NaN; top-p
always keeps the most likely token; top-k is capped at the vocabulary. Only NaN
logits from the model itself (broken weights) still fail, and only that request.

A request with an output schema carries its own grammar matcher (constraints.py):
its logits are masked after the penalties and before temperature, top-k, top-p
and the choice, so it can only pick a token the grammar allows; the token then
advances the matcher, and the sequence ends (`stop`) where the grammar does.

A request that asks for logprobs (`params.logprobs`) gets them from the logits the
choice starts from: after the penalties and a schema's mask, before temperature,
top-k and top-p (vLLM by default reports the raw model's instead; here they are
what was actually weighed, so a greedy token is always the top-1). That row alone
pays for them: one log_softmax and one topk on its own (V,) logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from textstream.engines.base import PromptTooLongError
from textstream.engines.transformers.constraints import advance, constrain
from textstream.job import LOWEST_LOGPROB, SamplingParams, Step

#: Largest finite float32: penalized logits are clamped into ±this.
FINITE = torch.finfo(torch.float32).max


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    #: Tokens this request may still generate (max_new_tokens, capped by the window).
    budget: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None = None
    #: Of `prompt_ids`, how many were generated earlier (a job taken over).
    generated: int = 0
    #: (seen, counts), both (V,): kept only when a penalty asks for it, and made at
    #: the first `choose`, on the thread that decodes (see `choose`).
    history: tuple[torch.Tensor, torch.Tensor] | None = None
    #: The request's own llguidance `LLMatcher` when its output must match a schema.
    matcher: Any = None
    #: The grammar is complete: the sequence ends here.
    complete: bool = False
    #: The last chosen token's logprobs (Step.logprobs), when params.logprobs asks.
    logprobs: tuple[float, list[tuple[int, float]]] | None = None

    @property
    def prompt_length(self) -> int:
        """The request's own prompt: `prompt_ids` less the tokens generated earlier."""
        return len(self.prompt_ids) - self.generated

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits (V,): penalties (when a penalty
        is set), then greedy or sampled; the penalty history then counts the token.

        The history is made here rather than in `start_sequence`, which runs on the
        request's own thread: filling two vocabulary-sized tensors is an OpenMP
        parallel region, and a thread's first one gives it an OpenMP thread pool
        for as long as it lives. With more pool threads than CPUs, libgomp stops
        spinning between regions, and every decode step (about a thousand
        regions) then waits on a wake-up: twice as slow (BENCHMARKS.md)."""
        if self.params.penalized:
            if self.history is None:
                ids = torch.tensor(self.prompt_ids, device=logits.device)
                self.history = seen_tokens(ids, self.generated, logits.shape[-1], logits.device)
            logits = penalize(logits, self.params, *self.history)
        if self.matcher is not None:
            logits = constrain(logits, self.matcher)
        token = next_token(logits, self.params, self.generator)
        if self.params.logprobs is not None:
            self.logprobs = token_logprobs(logits, token, self.params.logprobs)
        if self.matcher is not None:
            self.complete = advance(self.matcher, token)
        if self.history is not None:
            self.history[0][token] = True
            self.history[1][token] += 1
        return token

    def finish_reason(self, token: int, produced: int) -> str | None:
        """Why the sequence ends at this token (its `produced`-th), if it does."""
        if self.complete or (token in self.stop_ids and not self.params.ignore_eos):
            return "stop"
        return "length" if produced == self.budget else None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: the batch picks these rows with one shared argmax."""
        return (
            self.params.greedy
            and not self.params.penalized
            and self.matcher is None
            and self.params.logprobs is None
        )

    def step(self, token: int, produced: int) -> Step:
        """The Step for `token` (its `produced`-th), with its logprobs if asked for."""
        logprobs, self.logprobs = self.logprobs, None
        return Step(token, self.finish_reason(token, produced), logprobs)


def start_sequence(
    prompt_ids: list[int],
    params: SamplingParams,
    generated: int,
    *,
    context_length: int,
    stop_ids: frozenset[int],
    device: torch.device,
    matcher: Any = None,
) -> Sequence:
    """Check a request against the context window and set up its decode state.

    The last `generated` ids of `prompt_ids` were generated earlier (a job taken
    over): presence and frequency penalties count them, and `matcher` (the
    request's grammar, if it has one) is advanced past them."""
    room = context_length - len(prompt_ids)
    if room <= 0:
        raise PromptTooLongError(
            f"prompt is {len(prompt_ids)} tokens; the model's context window is {context_length}"
        )
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    budget = min(params.max_new_tokens, room)
    sequence = Sequence(prompt_ids, params, budget, stop_ids, generator, generated)
    if matcher is not None:
        for token in prompt_ids[len(prompt_ids) - generated :] if generated else ():
            sequence.complete = advance(matcher, token)
        sequence.matcher = matcher
    return sequence


def seen_tokens(
    ids: torch.Tensor, generated: int, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seen, counts), both (V,): every id so far, and how often each of the last
    `generated` (the completion's own) occurs."""
    seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    counts = torch.zeros(vocab_size, device=device)
    seen[ids] = True
    if generated:
        counts.index_add_(0, ids[-generated:], torch.ones(generated, device=device))
    return seen, counts


def penalize(
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
    # A tiny repetition penalty divides a logit into inf: keep them comparable. (NaN,
    # from the model, stays NaN: clamp leaves it, and sampling refuses it.)
    return logits.clamp(-FINITE, FINITE)


def token_logprobs(
    logits: torch.Tensor, token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s logprob under logits (V,) and the `top` most likely (id, logprob)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).clamp(min=LOWEST_LOGPROB)
    chosen = float(logprobs[token].item())
    if not top:
        return chosen, []
    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    return chosen, list(zip(ids.tolist(), values.tolist(), strict=True))


def next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """logits: (vocab,) float. Greedy argmax, or temperature/top-k/top-p sampling."""
    if params.greedy:
        return int(torch.argmax(logits).item())
    logits = logits.float().clamp(-FINITE, FINITE)
    # Shifted so the largest is 0: dividing by any temperature > 0 cannot overflow
    # (the best token stays at 0, the others go towards -inf).
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[0] = False  # a top_p that rounds to 0 in float32 still keeps one token
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
