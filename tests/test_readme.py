"""The README's first screen works as written: its SDK snippet runs against a
service (the tiny GPT-2 here; offline, `make run` serves SmolLM2 the same way)."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO

README_BASE = "http://localhost:8000/v1"


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)


def test_the_readme_sdk_snippet_runs_as_written(service):
    snippet = readme_python_blocks()[0]
    assert README_BASE in snippet and "temperature=0" in snippet
    assert 'model="' not in snippet  # the served name is asked, not guessed
    out = subprocess.run(
        [sys.executable, "-c", snippet.replace(README_BASE, service.base + "/v1")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip(), out.stdout  # the model's answer, streamed


def test_the_readme_says_what_the_first_run_costs_and_leaves():
    top = (REPO / "README.md").read_text()[:6000]  # the first screen or so
    for words in ("make run PORT=", "REDIS_URL", ".redis/", "MODEL_CACHE_DIR", "GB"):
        assert words in top, words
