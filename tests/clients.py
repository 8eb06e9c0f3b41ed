"""Third-party OpenAI clients (the openai 2.x SDK, openai-agents, litellm,
langchain-openai, pydantic-ai, instructor, the llm CLI), run as they are used: a
script in their own venv (.venv-clients, made by `make install-dev` from
requirements-clients.txt), since openai-agents wants openai<3 and the service pins
openai 3."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from typing import Any

from bench.cluster import REPO

CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"


def run_client(script: str, timeout: float = 120, **env: str) -> Any:
    """Run `script` (Python, dedented) with the clients' venv; it prints one JSON
    value on its last line of stdout, which is returned. A failing script fails the
    test with its stderr (a missing venv too: `make install-dev` makes it)."""
    assert CLIENTS_PYTHON.exists(), f"{CLIENTS_PYTHON} is missing: run make install-dev"
    full_env = {
        **os.environ,
        # litellm would fetch its model price list from GitHub at import.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused"),
        # openai-agents would export traces to OpenAI.
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
        **env,
    }
    full_env.pop("PYTHONPATH", None)  # the clients' venv only, not the service's
    done = subprocess.run(
        [str(CLIENTS_PYTHON), "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd="/tmp",
    )
    assert done.returncode == 0, f"client script failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])
