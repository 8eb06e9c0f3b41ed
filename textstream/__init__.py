"""textstream: stream LLM completions token by token over Server-Sent Events.

One folder per process, and what both share at the top:

    api/        the API process: HTTP in (native.py, openai.py), submit.py onto
                the queue (queue.py), the stream back out as SSE (relay/)
    worker/     the worker process: claims jobs (main.py, queue.py), runs the task
                body (completion.py), turns ids into text (detokenize.py, stops.py),
                writes the job's stream (writer.py)
    engines/    what generates: base.py (the interface), transformers/, openai.py,
                fake.py; the only package that imports torch
    transport/  the contract between the two: the job stream's format and its Lua
                scripts; imports neither side

    shared:     config, keys (every Redis key), connections (every Redis client),
                logs, job (the job and its sampling parameters), registry (worker
                heartbeats), fairness (the fair order's scripts), metrics (names),
                sources (what MODEL_ID means), prompts, grammars, tools

A request's journey: app.py -> api/native.py or api/openai.py -> api/submit.py ->
api/queue.py (ModelQ) -> worker/main.py -> worker/completion.py -> engines/ ->
worker/writer.py (Redis Stream) -> api/relay/sse.py -> client.
"""

__version__ = "0.1.0"
