"""The FastAPI app: `uvicorn app:app`. Built by `textstream.api.create_app`; tests call
the factory with their own settings."""

from textstream.api import create_app

app = create_app()
