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


class CompletionJob(BaseModel):
    """The ModelQ task payload: everything a worker needs to generate one completion."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    prompt: str
    prompt_format: PromptFormat = "auto"
    params: SamplingParams = SamplingParams()
    enqueued_at: float = 0.0
