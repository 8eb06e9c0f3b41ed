"""The metrics both processes agree on: their names, buckets and help texts.

Workers add their finished jobs' figures to histograms in Redis
(worker/metrics.py), API processes count requests there and render what Redis
holds (api/metrics.py), so every API process answers /metrics with the same
global figures. Names follow vLLM's where they mean the same
(`vllm:time_to_first_token_seconds` -> `textstream_time_to_first_token_seconds`).
"""

from __future__ import annotations

PREFIX = "textstream_"
LATENCY = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
DURATION = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
]
HISTOGRAMS: dict[str, tuple[str, list[float]]] = {
    "time_to_first_token_seconds": ("Time from enqueue to the first token.", LATENCY),
    "inter_token_latency_seconds": ("Time between consecutive token events.", LATENCY),
    "e2e_request_latency_seconds": ("Time from enqueue to the end of the job.", DURATION),
    "request_queue_time_seconds": ("Time a job waited before a worker started it.", DURATION),
    "request_generation_tokens": (
        "Tokens generated per job.",
        [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0],
    ),
}
COUNTERS = {
    "generation_tokens": "Tokens generated, all jobs.",
    "prompt_tokens": "Prompt tokens processed, all jobs.",
    "request_success": "Jobs that ended with `done`.",
    "request_failure": "Jobs that ended with an error (cancelled included).",
}
