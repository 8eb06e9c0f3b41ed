"""The FastAPI app: `uvicorn app:app`. Built by `textstream.api.app.create_app`;
tests call the factory with their own settings."""

from textstream.api.app import create_app

app = create_app()
