"""Multi-byte characters: GPT-2's byte-level BPE splits them across tokens, and the
stream must never carry U+FFFD or half a character."""

from __future__ import annotations

import pytest
from helpers import stream
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TRAINED, gpt2_tokenizer

from textstream.worker.detokenize import REPLACEMENT_CHAR, IncrementalDetokenizer

TOKENIZER = gpt2_tokenizer()


def pieces_for(text: str) -> tuple[list[int], list[str]]:
    ids = TOKENIZER.encode(text)
    detokenizer = IncrementalDetokenizer(TOKENIZER)
    return ids, [detokenizer.add(i) for i in ids]


@pytest.mark.parametrize(
    "text",
    ["👋🌍 café 日本語", "emoji at the end 🎉", "Привет, 世界! ✓ naïve", "🇫🇷🏳️‍🌈 family 👨‍👩‍👧"],
)
def test_split_characters_are_held_back_until_complete(text):
    ids, pieces = pieces_for(text)
    assert len(ids) > len(text.split())  # the text really is split into byte tokens
    assert "".join(pieces) == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "" in pieces  # at least one token was held back mid-character


def test_a_character_cut_off_at_the_end_is_never_emitted():
    ids = TOKENIZER.encode("ok 👋")
    detokenizer = IncrementalDetokenizer(TOKENIZER)
    pieces = [detokenizer.add(i) for i in ids[:-1]]  # drop the emoji's last byte token
    assert "".join(pieces) == "ok"
    assert TOKENIZER.decode(ids[:-1]).startswith("ok") and REPLACEMENT_CHAR in TOKENIZER.decode(
        ids[:-1]
    )


# A genuine U+FFFD at the very end is indistinguishable from an incomplete
# character (it is held back, as in TGI), so the alphabet leaves it out.
@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.characters(exclude_categories=("Cs",), exclude_characters=REPLACEMENT_CHAR),
        max_size=40,
    )
)
def test_pieces_always_join_to_the_decoded_text(text):
    ids, pieces = pieces_for(text)
    # The contract's reference is the decode of the ids, not the input text: a
    # literal "<|endoftext|>" encodes to GPT-2's special token, which decoding skips
    # (hypothesis finds that string among the code's constants).
    decoded = TOKENIZER.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(pieces) == decoded
    if "<|endoftext|>" not in text:
        assert decoded == text
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)


def test_literal_end_of_text_in_a_prompt_is_not_streamed_back():
    ids, pieces = pieces_for("a<|endoftext|>b")
    assert ids == [64, 50256, 65] and "".join(pieces) == "ab"


def test_service_streams_emoji_and_cjk_without_broken_characters(service):
    prompt = "Say hi in emoji:"
    response = stream(service.base, f"/completion/{prompt}", max_new_tokens=60)
    assert response.last.event == "done"
    tokens = [e.data["text"] for e in response.of("token")]
    assert not any(REPLACEMENT_CHAR in t for t in tokens)
    assert response.text == TRAINED[prompt]
    # Each event is valid text on its own: some carry a whole multi-byte character
    # that took several tokens to complete.
    assert any(ord(ch) > 0xFFFF for t in tokens for ch in t)


def test_cut_mid_character_by_max_new_tokens_ends_cleanly(service):
    for limit in range(2, 12):
        response = stream(service.base, "/completion/Say hi in emoji:", max_new_tokens=limit)
        assert response.last.event == "done"
        assert REPLACEMENT_CHAR not in response.text
        assert TRAINED["Say hi in emoji:"].startswith(response.text)
