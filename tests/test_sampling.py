"""Stop strings and penalties, in isolation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from textstream.engines.transformers.sampling import penalize
from textstream.job import SamplingParams, normalize_stop
from textstream.worker.stops import StopMatcher


def expected_output(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """Generation stops at the first piece after which a stop string is in the text;
    the output ends where the earliest such occurrence begins. (Not the earliest in
    the text that would have followed: with stops "a" and " aa", pieces " a", "a"
    end at " ", since nothing is generated after " a".)"""
    text = ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet="abc ", max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_strings_are_never_half_streamed(pieces, stops):
    want, stopped = expected_output(pieces, stops)
    matcher, released = StopMatcher(stops), ""
    for piece in pieces:
        released += matcher.feed(piece)
        # Whatever was released is final: it is a prefix of the true output.
        assert want.startswith(released)
        if matcher.stopped:
            break
    released += matcher.flush()
    assert released == want
    assert matcher.stopped == stopped


def test_a_stop_inside_a_longer_one_ends_the_text_where_it_completes():
    # Found by Hypothesis: " aa" could still have matched from 0, but "a" already
    # completed, so generation ends there and the longer stop never can.
    matcher = StopMatcher(["a", " aa"])
    assert matcher.feed(" a") == " " and matcher.stopped


def test_stop_string_split_across_pieces():
    matcher = StopMatcher(["Japan"])
    out = [matcher.feed(p) for p in [" Paris.", " The capital of Ja", "pan is"]]
    assert out == [" Paris.", " The capital of ", ""] and matcher.stopped


def test_stop_list_is_validated():
    assert normalize_stop("x") == ["x"] and normalize_stop(None) == []
    with pytest.raises(ValueError, match="at most 4"):
        normalize_stop(["a", "b", "c", "d", "e"])


def test_penalties_follow_openai_and_hugging_face_definitions():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    seen = torch.tensor([True, True, False, True])
    counts = torch.tensor([1.0, 0.0, 0.0, 2.0])
    repetition = SamplingParams(repetition_penalty=2.0)
    assert penalize(logits, repetition, seen, counts).tolist() == [1.0, -4.0, 1.0, 0.25]
    openai = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    assert penalize(logits, openai, seen, counts).tolist() == [1.25, -2.0, 1.0, -0.75]
