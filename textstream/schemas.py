"""The job that travels from the API to a worker through ModelQ, and its parameters.

The API validates requests against its own limits (settings) before building a
`CompletionJob`; the worker trusts the job's shape but not the model's limits
(context window), which only it knows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PromptFormat = Literal["auto", "raw", "chat"]


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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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

    def sampling(self, default_max_new_tokens: int) -> SamplingParams:
        fields = self.model_dump(exclude={"prompt_format", "prompt"})
        fields["max_new_tokens"] = self.max_new_tokens or default_max_new_tokens
        return SamplingParams(**fields)


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
    prompt_format: PromptFormat = "auto"
    params: SamplingParams = SamplingParams()
    enqueued_at: float = 0.0
    #: Unix time after which the job ends with a `timeout` error (JOB_TIMEOUT).
    deadline: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline
