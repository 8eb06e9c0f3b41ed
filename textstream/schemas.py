"""The job that travels from the API to a worker through ModelQ, and its parameters.

The API validates requests against its own limits (settings) before building a
`CompletionJob`; the worker trusts the job's shape but not the model's limits
(context window), which only it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

PromptFormat = Literal["auto", "raw", "chat"]

#: At most this many stop strings per request (OpenAI's limit).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 100


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


class SamplingParams(BaseModel):
    """How to pick each next token. temperature 0 means greedy (the default)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k filtering")
    seed: int | None = Field(None, ge=0, lt=2**63)
    #: Keep generating past end-of-text (as vLLM's `ignore_eos`): fixed-length output
    #: for benchmarks and tests.
    ignore_eos: bool = False
    #: Generation ends before the first of these strings (which is not returned).
    stop: list[str] = Field(default_factory=list)
    #: OpenAI's penalties on tokens already generated (presence: once; frequency: per use).
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    #: Hugging Face's multiplicative penalty on every token seen (prompt included); 1 = off.
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )

    @property
    def deterministic(self) -> bool:
        """Same request, same output: what the response cache may store."""
        return self.greedy or self.seed is not None


class GenerationRequest(BaseModel):
    """Sampling fields a client may send: the `/completion` query string and the
    `POST /jobs` body share them. `max_new_tokens` defaults per deployment."""

    model_config = ConfigDict(allow_inf_nan=False)

    max_new_tokens: int | None = Field(None, ge=1, description="default DEFAULT_MAX_NEW_TOKENS")
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off")
    seed: int | None = Field(None, ge=0, lt=2**63)
    ignore_eos: bool = False
    prompt_format: PromptFormat = "auto"
    stop: list[str] | str | None = Field(None, description="up to 4 stop strings")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    use_cache: bool = Field(True, description="answer identical deterministic requests from cache")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | str | None) -> list[str]:
        return normalize_stop(value)

    def sampling(self, default_max_new_tokens: int) -> SamplingParams:
        fields = self.model_dump(exclude={"prompt_format", "prompt", "use_cache", "stream"})
        fields["max_new_tokens"] = self.max_new_tokens or default_max_new_tokens
        fields["stop"] = normalize_stop(self.stop)
        return SamplingParams(**fields)


class CompletionQuery(GenerationRequest):
    """`/completion/{question}` query string: the sampling fields, plus `stream`."""

    stream: bool = Field(True, description="false: one JSON answer once the job is done")


class JobRequest(GenerationRequest):
    """`POST /jobs` body. Unknown fields are refused: a typo such as `max_token`
    would otherwise be silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str


class CompletionJob(BaseModel):
    """The ModelQ task payload: everything a worker needs to generate one completion."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    prompt: str
    #: Chat requests carry messages (the worker applies the chat template); `prompt`
    #: is then empty.
    messages: list[dict[str, str]] | None = None
    prompt_format: PromptFormat = "auto"
    params: SamplingParams = SamplingParams()
    enqueued_at: float = 0.0
    #: Unix time after which the job ends with a `timeout` error (JOB_TIMEOUT).
    deadline: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline
