"""Reasoning apart from the answer: the splitter, and a model that thinks."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import Service
from helpers import service_env, stream
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build_tiny_gpt2

from bench.cluster import start_redis
from textstream.api.relay.thinking import ThinkSplitter


def split(pieces: list[str]) -> tuple[str, str]:
    """What the splitter makes of `pieces`: (thinking, answer)."""
    splitter, parts = ThinkSplitter(), {"thinking": "", "answer": ""}
    fed = [splitter.feed(piece) for piece in pieces]
    for kind, text in itertools.chain(*fed, splitter.flush()):
        parts["thinking" if kind == "thinking" else "answer"] += text
    return parts["thinking"], parts["answer"]


def test_a_think_block_splits_wherever_the_pieces_break():
    text = "\n<think>Paris is in France.</think>\n\nThe capital is Paris."
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            assert split([text[:cut], text[cut:cut2], text[cut2:]]) == (
                "Paris is in France.",
                "The capital is Paris.",
            )


def test_text_without_a_leading_block_passes_through():
    assert split(["<b>bold</b> and <think>not a block</think>"]) == (
        "",
        "<b>bold</b> and <think>not a block</think>",
    )
    assert split(["Hello", " world"]) == ("", "Hello world")
    assert split(["<thi"]) == ("", "<thi")  # ended undecided: it was text
    assert split(["<think>cut short"]) == ("cut short", "")  # ended while thinking


@settings(max_examples=200, deadline=None)
@given(
    thought=st.text(alphabet="ab<>/ \n", max_size=20).filter(lambda t: "</think>" not in t),
    answer=st.text(alphabet="ab<>/ \n", max_size=20),
    cuts=st.lists(st.integers(0, 60), max_size=6),
)
def test_any_split_of_the_pieces_gives_the_same_thinking_and_answer(thought, answer, cuts):
    text = f"<think>{thought}</think>{answer}"
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    assert split(pieces) == (thought, answer.lstrip("\n"))


# --- a model that thinks, end to end -------------------------------------------------

THOUGHT, ANSWER = "Light scatters off the air.", "Blue light scatters most."
THINKING_MODEL = {
    # raw prompt, for /completion and /jobs
    "Why is the sky blue?": f" <think>{THOUGHT}</think>\n {ANSWER}",
    # the chat layout the worker gives GPT-2 (prompts.DEFAULT_CHAT_TEMPLATE)
    "User: Why is the sky blue?\nAssistant:": f" <think>{THOUGHT}</think>\n {ANSWER}",
}


@pytest.fixture(scope="module")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    models = tmp_path_factory.mktemp("models")
    # 120 steps: it completes both prompts exactly from 80 on (checked with generate).
    model = build_tiny_gpt2(models / "thinker", steps=120, trained=THINKING_MODEL)
    workdir = tmp_path_factory.mktemp("thinker")
    proc, url = start_redis(workdir)
    svc = Service(workdir, service_env(url, str(model)), workers=1)
    yield svc
    svc.stop()
    proc.terminate()


def test_a_think_block_streams_as_thinking_events_apart_from_the_answer(thinker):
    params = {"max_new_tokens": 40, "prompt_format": "raw"}
    response = stream(thinker.base, "/completion/Why is the sky blue%3F", **params)
    assert response.last.event == "done"
    assert "".join(e.data["text"] for e in response.of("thinking")) == THOUGHT
    assert response.text.strip() == ANSWER
    status = httpx.get(f"{thinker.base}/jobs/{response.headers['x-job-id']}").json()
    assert status["thinking"] == THOUGHT and status["text"].strip() == ANSWER


def test_chat_sends_reasoning_content_as_vllm_does(thinker):
    client = openai.OpenAI(base_url=f"{thinker.base}/v1", api_key="x", max_retries=0)
    args = {
        "model": "thinker",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "max_tokens": 40,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**args).choices[0].message
    assert whole.model_extra["reasoning_content"] == THOUGHT
    assert whole.content.strip() == ANSWER
    chunks = list(client.chat.completions.create(**args, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert reasoning == THOUGHT
    assert "".join(d.content or "" for d in deltas).strip() == ANSWER


def test_resuming_in_the_middle_of_the_thinking_repeats_and_loses_nothing(thinker):
    job = httpx.post(
        thinker.base + "/jobs",
        json={"prompt": "Why is the sky blue?", "max_new_tokens": 40, "prompt_format": "raw"},
    ).json()
    everything = stream(thinker.base, job["events_url"])
    marks = [e for e in everything.events if e.id]
    for mark in marks:
        rest = stream(thinker.base, job["events_url"], last_event_id=mark.id).events
        # What a client had when it dropped (every event up to the mark, those split
        # off a stored event included), then what the resumed stream sends.
        upto = everything.events[: everything.events.index(mark) + 1]
        thought = "".join(e.data["text"] for e in upto + rest if e.event == "thinking")
        answer = "".join(e.data["text"] for e in upto + rest if e.event == "token")
        assert thought == THOUGHT and answer.strip() == ANSWER, mark.id
