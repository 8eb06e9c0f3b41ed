"""The API process: HTTP in, jobs onto the queue, events back out as SSE.

Never runs a model, never imports torch. `app.create_app` builds the FastAPI app.
"""
