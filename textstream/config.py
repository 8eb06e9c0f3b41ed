"""Settings: the one place configuration is read (environment and `.env`).

Every field is listed, with a one-line comment, in `.env.example`. Nothing else in
the code reads `os.environ`; long-lived objects receive a `Settings` instance.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from textstream.sources import BUNDLED_MODEL


def parse_key_weights(text: str) -> dict[str, float]:
    """API_KEY_WEIGHTS (`key=weight,…`) by key."""
    weights: dict[str, float] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        key, sep, value = entry.rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not key or not 0.01 <= weight <= 100:  # NaN fails too
            raise ValueError("API_KEY_WEIGHTS entries are key=weight, weights from 0.01 to 100")
        weights[key] = weight
    return weights


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- Redis -------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = Field(
        2.0, gt=0, description="seconds before a Redis call counts as failed"
    )
    #: The job streams and their state hashes (per-token traffic). Empty: REDIS_URL,
    #: which keeps the queue, registry, metrics, limits and cache in any case.
    streams_redis_url: str = ""
    #: STREAMS_REDIS_URL names a Redis Cluster (any node's URL).
    streams_redis_cluster: bool = False
    #: The tokens a worker process has ready within this window, for all its jobs,
    #: go to Redis in one call, a job's in one stream entry (a token waits at most
    #: this long, a job's first token not at all; 50 ms is 20 updates a second per
    #: stream, and about half the Redis CPU per token of no window: BENCHMARKS.md);
    #: 0 = every token in a call of its own, as soon as it is ready.
    stream_flush_ms: int = Field(50, ge=0, le=1000)

    # --- model (worker side) -----------------------------------------------------
    model_id: str = "openai-community/gpt2"
    model_fallback: str = BUNDLED_MODEL
    #: Name the workers announce and clients pick with `model` (vLLM's
    #: --served-model-name); empty: the model's own name.
    served_model_name: str = ""
    #: The model a request that names none goes to; empty: the one being served.
    default_model: str = ""
    #: auto: a `<think>...</think>` block opening a completion streams apart from
    #: the answer (`thinking` events; `reasoning_content` in chat); off: raw text.
    thinking: Literal["auto", "off"] = "auto"
    #: For MODEL_ID=openai:<url>#<model>: the upstream's key, and how long it may go
    #: without sending a chunk (keep-alive comments and a trickle of bytes do not
    #: count; then retried). The job's deadline (JOB_TIMEOUT) bounds an attempt too.
    upstream_api_key: str = ""
    upstream_timeout: float = Field(120.0, gt=0)
    #: The longest piece (one chunk's text) an upstream may send: a longer one ends
    #: the job with `upstream_error` (no model sends a token that long).
    upstream_max_piece_chars: int = Field(65536, ge=64)
    #: How long an upstream that fails (429, 5xx, unreachable) is retried before the
    #: job ends with `upstream_error` (never past the job's deadline).
    upstream_retry_seconds: float = Field(30.0, ge=0)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    prompt_format: Literal["auto", "raw", "chat"] = "auto"
    torch_threads: int = Field(0, ge=0, description="CPU threads per worker; 0 = torch default")
    #: auto: a worker with --concurrency > 1 runs its jobs as one continuous batch
    #: (batching.py); off: each ModelQ thread runs its own decode loop.
    batching: Literal["auto", "off"] = "auto"
    #: Most prompt tokens (rows x padded length) one prefill pass takes; longer
    #: prompts are prefilled in chunks, a decode step for the running streams between.
    prefill_chunk_tokens: int = Field(256, ge=16)
    #: auto: a GGUF model on CPU keeps the file's own quantization (Q4 layers int4,
    #: Q5-Q8 int8; engines/transformers/gguf_types.py), anything else its DTYPE;
    #: int8 / int4: weight-only int8 / int4 (groups of 32, like GGUF Q4_1) linear
    #: layers on CPU (faster decode; greedy output can differ from float32's);
    #: none: weights in DTYPE (a GGUF's dequantized to float).
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    #: torch.compile the decode step: off, background (serve eagerly until it is
    #: compiled), start (compile before serving).
    compile: Literal["off", "background", "start"] = "off"
    #: Llama-family models (llama, mistral, qwen2) run a compact forward pass with
    #: transformers' numbers and a fraction of its per-layer overhead
    #: (engines/transformers/llama.py); false: transformers' own forward.
    compact_pass: bool = True
    #: Batched requests get bit for bit their logits alone with quantized layers or
    #: in bfloat16, on CPU (the compact pass attends row by row: 10-25 % slower a
    #: step at 8 rows); a float32 model is unaffected (its batch attends in one call
    #: and keeps the same greedy tokens).
    batch_invariant: bool = False
    #: Where converted copies of GGUF models are kept (loaded instead of converting
    #: again); empty: convert at every start.
    model_cache_dir: str = "~/.cache/textstream"

    # --- request limits ----------------------------------------------------------
    default_max_new_tokens: int = Field(20, ge=1)
    max_new_tokens_limit: int = Field(1024, ge=1)
    max_prompt_chars: int = Field(8000, ge=1)

    # --- streams and jobs --------------------------------------------------------
    job_ttl: int = Field(3600, ge=1, description="seconds a job's events are kept")
    job_timeout: float = Field(300.0, gt=0, description="seconds from enqueue to the end")
    #: The most text one job publishes (whatever its engine or max_new_tokens): the
    #: job ends there with finish reason `length`.
    max_output_chars: int = Field(1 << 20, ge=1)
    max_queued_jobs: int = Field(1000, ge=1, description="queue length past which 429")
    #: Workers take the waiting job of the caller with the least service (fairness.py);
    #: off: the oldest job, whoever's (arrival order, as ModelQ alone does).
    fair_queueing: bool = True
    #: Jobs one caller (API key, or IP without keys) may have waiting in a model's
    #: queue, so that one caller never takes all of MAX_QUEUED_JOBS; 0: half of it.
    max_queued_per_caller: int = Field(0, ge=0)
    queue_status_seconds: float = Field(2.0, gt=0, description="queued-position event period")
    redis_grace_seconds: float = Field(5.0, ge=0, description="an open stream waits this long")
    cache_ttl: int = Field(3600, ge=0, description="response cache lifetime; 0 disables")
    #: caller: each API key has its own response cache (one key never gets another's
    #: job); global: identical requests share answers across keys.
    cache_scope: Literal["caller", "global"] = "caller"
    #: A stored /v1/responses response (its request and conversation, for
    #: GET /v1/responses/{id} and previous_response_id) is kept this long from its
    #: creation; its output is its job's events, kept JOB_TTL after the job ends, so
    #: the default (and the cap) is JOB_TTL + JOB_TIMEOUT: kept as long as the output is.
    responses_ttl: int = Field(3900, ge=1, description="seconds a stored response is kept")
    housekeeping_seconds: float = Field(30.0, gt=0, description="API queue housekeeping period")
    #: A job for a model that is not configured here (MODEL_ID / SERVED_MODEL_NAME)
    #: and that no live worker serves ends with `no_worker` after waiting this long
    #: (plus up to HOUSEKEEPING_SECONDS): its workers are gone, not starting.
    no_worker_seconds: float = Field(120.0, gt=0)
    enqueue_timeout: float = Field(5.0, gt=0)
    #: Submissions one API process works on at once (the Redis steps of queueing a
    #: job); a burst beyond it waits its turn, up to ADMISSION_WAIT_SECONDS, then 429.
    max_submitting: int = Field(256, ge=1)
    admission_wait_seconds: float = Field(10.0, gt=0)
    sse_ping_seconds: int = Field(15, ge=1)
    read_block_ms: int = Field(5000, ge=10, description="XREAD BLOCK per call")

    # --- workers -----------------------------------------------------------------
    worker_heartbeat_seconds: float = Field(2.0, gt=0)
    worker_shutdown_grace: float = Field(30.0, ge=0)
    #: A running job's heartbeat is written every 0.25 s (worker/queue.py); under
    #: long prefills on a loaded host the oldest one read was 0.27 s old
    #: (bench/takeover.py). A full GC held a worker 0.46 s until workers froze
    #: what they load (gc.freeze: now under a millisecond). 1.25 s is five beats,
    #: over 4x that oldest. Under 1 s (four beats) a live worker's jobs would be
    #: given away at a scheduling hiccup; NaN and infinity are refused. A live
    #: worker taken over all the same loses its job stream's ownership and stops.
    takeover_after_seconds: float = Field(
        1.25, ge=1.0, allow_inf_nan=False, description="silent worker's jobs requeued"
    )

    # --- security ----------------------------------------------------------------
    api_keys: str = Field("", description="comma-separated; empty = open")
    #: A key's share of the queue relative to the others (default 1 each):
    #: `key=weight,…` for keys in API_KEYS, weights from 0.01 to 100 (fairness.py).
    api_key_weights: str = ""
    stream_token_seconds: int = Field(600, ge=1)
    rate_limit: int = Field(0, ge=0, description="requests/minute per key or IP; 0 = off")
    #: Prompt and generated tokens a minute per key or IP, as OpenAI's TPM: a request
    #: reserves its prompt and max_tokens when queued, and is charged what it used
    #: once it ends (api/security.Guard.reserve_tokens).
    token_rate_limit: int = Field(0, ge=0, description="tokens/minute per key or IP; 0 = off")
    max_streams_per_key: int = Field(0, ge=0, description="concurrent streams; 0 = off")
    #: What an API process holds for its callers (stream slots, a reader's claim on
    #: its job) is a lease it renews every third of this (api/leases.py): a process
    #: that dies stops holding them within this long.
    api_lease_seconds: float = Field(15.0, ge=1, le=3600)
    #: A /completion stream whose client drops keeps its job running this long for the
    #: client's reconnect (EventSource's Last-Event-ID names the job); the job is
    #: cancelled only when nobody has come back by then. 0: cancelled at once.
    reconnect_grace_seconds: float = Field(20.0, ge=0, le=3600)
    cors_origins: str = Field("", description="comma-separated origins; empty = none")
    #: Host names the API answers to (`*` any, `*.example.com` a domain); empty: any,
    #: except that a request arriving on a loopback address must name a local host
    #: (DNS rebinding). Behind a proxy on the same host, list its public names.
    allowed_hosts: str = ""
    #: /docs, /redoc and /openapi.json: auto = open when API_KEYS is empty, behind
    #: the key when it is set; open; closed (behind the key whenever keys are set).
    docs: Literal["auto", "open", "closed"] = "auto"
    #: Largest request body accepted (413 past it) and largest request head, request
    #: line plus headers (431 past it, with `textstream api`/`serve`).
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_header_bytes: int = Field(16 << 10, ge=1024)
    #: How long a request (line, headers, body) may take to arrive whole: 408 and
    #: the connection closed past it (`textstream api`/`serve`).
    request_read_seconds: float = Field(30.0, gt=0, le=3600)

    # --- logging -----------------------------------------------------------------
    log_level: str = "INFO"
    log_prompts: bool = False
    log_format: Literal["auto", "json", "text"] = "auto"

    @property
    def streams_url(self) -> str:
        """Where the job streams live (STREAMS_REDIS_URL, else REDIS_URL)."""
        return self.streams_redis_url or self.redis_url

    @property
    def streams_shared(self) -> bool:
        """The streams share the queue's Redis (one client serves both roles)."""
        return self.streams_url == self.redis_url and not self.streams_redis_cluster

    @property
    def queued_per_caller_limit(self) -> int:
        return self.max_queued_per_caller or max(1, self.max_queued_jobs // 2)

    @property
    def key_weights(self) -> dict[str, float]:
        return parse_key_weights(self.api_key_weights)

    @field_validator("api_key_weights")
    @classmethod
    def _check_key_weights(cls, value: str) -> str:
        parse_key_weights(value)  # a bad entry stops the process at start
        return value

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def allowed_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "mps") or value == "cuda" or value.startswith("cuda:"):
            return value
        raise ValueError("DEVICE must be auto, cpu, mps, cuda or cuda:N")

    @field_validator("max_new_tokens_limit")
    @classmethod
    def _limit_covers_default(cls, value: int, info: object) -> int:
        default = getattr(info, "data", {}).get("default_max_new_tokens", 1)
        if value < default:
            raise ValueError("MAX_NEW_TOKENS_LIMIT must be >= DEFAULT_MAX_NEW_TOKENS")
        return value

    @field_validator("streams_redis_cluster")
    @classmethod
    def _cluster_has_its_own_url(cls, value: bool, info: object) -> bool:
        """ModelQ cannot run on a cluster: the streams need a URL of their own."""
        if value and not getattr(info, "data", {}).get("streams_redis_url"):
            raise ValueError(
                "STREAMS_REDIS_CLUSTER needs STREAMS_REDIS_URL: the queue (REDIS_URL) "
                "cannot live on a Redis Cluster"
            )
        return value

    @field_validator("cache_ttl")
    @classmethod
    def _cache_within_job_ttl(cls, value: int, info: object) -> int:
        """A cached answer is a job's stream, which lives JOB_TTL: cap the entry there."""
        job_ttl: int = getattr(info, "data", {}).get("job_ttl", value)
        return min(value, job_ttl)

    @field_validator("responses_ttl")
    @classmethod
    def _responses_within_job(cls, value: int, info: object) -> int:
        """A response without its job's events has no output left: cap it where the
        events of a job that ran to its deadline end (JOB_TTL + JOB_TIMEOUT)."""
        data = getattr(info, "data", {})
        cap: int = data.get("job_ttl", value) + math.ceil(data.get("job_timeout", 0))
        return min(value, cap)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once at start-up (edges call this)."""
    return Settings()
