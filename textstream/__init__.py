"""textstream: stream LLM completions token by token over Server-Sent Events.

The request's journey, module by module:

    app.py (edge) -> api.py (routes) -> queue.py (ModelQ enqueue)
        -> tasks.py / worker.py (claims the job) -> engine.py (the model)
        -> detokenize.py (ids -> safe text) -> events.py (Redis Stream)
        -> sse.py (XREAD -> SSE) -> client

Every Redis key name is built in keys.py; settings live in config.py.
"""

__version__ = "0.1.0"
