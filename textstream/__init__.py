"""textstream: stream LLM completions token by token over Server-Sent Events.

One folder per process, and what both share at the top:

    api/        the API process: HTTP in (native.py, openai.py), submit.py onto
                the queue, the stream back out as SSE
    worker/     the worker process: claims jobs (main.py), runs the task body
                (completion.py), turns ids into text (detokenize.py, stops.py)
    engines/    what generates: base.py (the interface), transformers/, fake.py;
                the only package that imports torch
    transport/  worker -> client: the job stream contract (events.py), mux, sse

    shared:     config, keys (every Redis key), connections (every Redis client),
                logs, job (the job and its sampling parameters), jobqueue (ModelQ),
                registry (worker heartbeats), metrics, sources (what MODEL_ID means)

A request's journey: app.py -> api/native.py or api/openai.py -> api/submit.py ->
jobqueue.py (ModelQ) -> worker/main.py -> worker/completion.py -> engines/ ->
transport/events.py (Redis Stream) -> transport/sse.py -> client.
"""

__version__ = "0.1.0"
