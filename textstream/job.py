"""The job that travels from the API to a worker through ModelQ, and its parameters.

Used by both processes. The sampling fields are declared here once, as annotated
types (`Temperature`, `TopP`, ...): the job's `SamplingParams` and every request
body the API accepts (api/protocol.py) use the same bounds.

The API validates requests against its own limits (settings) before building a
`CompletionJob`; the worker trusts the job's shape but not the model's limits
(context window), which only it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PromptFormat = Literal["auto", "raw", "chat"]

#: A temperature below this is greedy (as vLLM): dividing logits by less gives
#: nothing but float trouble, and the most likely token wins anyway.
GREEDY_BELOW = 1e-5

#: At most this many stop strings per request (OpenAI's limit).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 100

# -- the sampling fields, declared once ---------------------------------------------
MaxNewTokens = Annotated[int, Field(ge=1)]
#: OpenAI's range. (The native API allowed up to 100 before; past 2 the text is noise.)
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 = greedy")]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
#: Past any vocabulary; the bound keeps a 2**70 from reaching an upstream engine.
TopK = Annotated[int, Field(ge=0, le=2**31 - 1, description="0 = off")]
Seed = Annotated[int, Field(ge=0, lt=2**63)]
#: vLLM's `priority` (lower first), among the caller's own jobs only (fairness.py).
Priority = Annotated[
    int,
    Field(ge=-1000, le=1000, description="lower first, among this caller's own jobs"),
]
#: How long a request will wait in the queue for a worker, in seconds (a day at
#: most; JOB_TIMEOUT still bounds the whole job).
MAX_QUEUE_TIMEOUT = 86400.0
QueueTimeout = Annotated[
    float,
    Field(
        gt=0.0,
        le=MAX_QUEUE_TIMEOUT,
        description="seconds to wait for a worker, then `queue_timeout`",
    ),
]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, description="1 = off")]
#: Alternatives per token reported with its logprob: OpenAI's chat bound
#: (`top_logprobs` 0..20; completions' `logprobs` is 0..5, checked in protocol.py).
MAX_TOP_LOGPROBS = 20
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
#: A logprob of -inf (a token a schema forbids) as JSON can carry it (as vLLM's).
LOWEST_LOGPROB = -9999.0


def normalize_stop(value: str | list[str] | None) -> list[str]:
    """A stop string or a list of them, as OpenAI accepts; empty strings dropped."""
    stops = [value] if isinstance(value, str) else list(value or [])
    stops = [s for s in stops if s]
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop string is at most {MAX_STOP_CHARS} characters")
    return stops


@dataclass
class Step:
    """One generated token; `finish_reason` is set on the last one."""

    token_id: int
    finish_reason: str | None = None
    #: With `SamplingParams.logprobs`: (the token's logprob, [(id, logprob)] of the
    #: most likely alternatives, best first). None when not asked for.
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


class SamplingParams(BaseModel):
    """How to pick each next token. temperature 0 means greedy (the default)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: MaxNewTokens = 20
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    #: Keep generating past end-of-text (as vLLM's `ignore_eos`): fixed-length output
    #: for benchmarks and tests.
    ignore_eos: bool = False
    #: Generation ends before the first of these strings (which is not returned).
    stop: list[str] = Field(default_factory=list)
    #: OpenAI's penalties on tokens already generated (presence: once; frequency: per use).
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    #: Hugging Face's multiplicative penalty on every token seen (prompt included); 1 = off.
    repetition_penalty: RepetitionPenalty = 1.0
    #: Structured output: the JSON schema the completion must match, as canonical
    #: JSON text (textstream/grammars.py); None for free text. Part of the
    #: response-cache key, as every parameter here.
    json_schema: str | None = None
    #: Report each token's logprob and this many most likely alternatives (None:
    #: off). From the distribution the sampler draws from after penalties (and a
    #: schema's mask), before temperature, top-k and top-p (README, "logprobs").
    logprobs: TopLogprobs | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )

    @property
    def deterministic(self) -> bool:
        """Same request, same output: what the response cache may store."""
        return self.greedy or self.seed is not None


class CompletionJob(BaseModel):
    """The ModelQ task payload: everything a worker needs to generate one completion."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    #: The served model it is for: it waits on that model's queue.
    model: str = ""
    prompt: str
    #: Chat requests carry messages (the worker applies the chat template); `prompt`
    #: is then empty.
    messages: list[dict[str, Any]] | None = None
    #: OpenAI's `tools` offered to the model (rendered into the prompt; prompts.py).
    tools: list[dict[str, Any]] | None = None
    #: OpenAI's `tool_choice` and `parallel_tool_calls` as the client sent them (an
    #: upstream engine passes them on; the built-in one has `params.json_schema`).
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    #: Continue the last (assistant) message instead of starting a new one.
    continue_final: bool = False
    prompt_format: PromptFormat = "auto"
    params: SamplingParams = SamplingParams()
    enqueued_at: float = 0.0
    #: Unix time after which the job ends with a `timeout` error (JOB_TIMEOUT).
    deadline: float | None = None
    #: Unix time by which a worker must have started it (the request's
    #: `queue_timeout`); past it the job ends with `queue_timeout`, never run.
    queue_deadline: float | None = None
    #: The fair order's record (fairness.py): whose it is (the caller's identity:
    #: a key's hash or `ip:…`, never a key), that caller's weight, the job's
    #: priority among the caller's jobs, and the estimate charged when claimed
    #: (weighted tokens / weight), settled by the worker when the job ends.
    caller: str = ""
    weight: float = 1.0
    priority: int = 0
    charge: float = 0.0
    #: TOKEN_RATE_LIMIT's window this job reserved `quota_tokens` in (its prompt and
    #: max_new_tokens, estimated): the worker replaces that by what it used.
    quota_key: str = ""
    quota_tokens: int = 0

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def waited_too_long(self, now: float) -> bool:
        return self.queue_deadline is not None and now > self.queue_deadline
