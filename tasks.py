"""The worker side, as the README names it: `textstream.worker.main.serve` runs one
worker process (load the model, claim jobs through ModelQ, publish events). Start
workers with `python runner.py`; the task body is `textstream.worker.completion`."""

from textstream.worker.main import drain, serve

__all__ = ["drain", "serve"]

if __name__ == "__main__":
    raise SystemExit(serve())
