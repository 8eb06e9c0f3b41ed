"""Incremental detokenization that never emits half a character.

GPT-2's byte-level BPE splits one emoji or CJK character across several tokens;
decoding the tokens one at a time yields U+FFFD for the pieces. As TGI's
`decode_token` does, keep two offsets into the generated ids:

    prefix_offset .. read_offset   ids whose text was already emitted (context)
    read_offset  .. end            ids not yet emitted

Decode the window with and without the new ids; the difference is the new text.
If it ends in U+FFFD the character is incomplete: emit nothing and wait for the
next token. Decoding a small window (not the whole sequence) keeps each step
O(window), and the context keeps tokenizers that strip a leading space from the
first token (SentencePiece-style) consistent.

A genuine U+FFFD produced by the model is emitted with the next piece; only at the
very end of a completion is it indistinguishable from an incomplete character,
and then it is held back like one.
"""

from __future__ import annotations

from textstream.engines.base import Decoder

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text pieces, safely.

    The concatenation of all pieces equals `decode(all_ids)` with the same flags,
    minus any trailing incomplete character still held back.
    """

    def __init__(self, tokenizer: Decoder, initial_ids: list[int] | None = None) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = list(initial_ids or [])
        # Text of `initial_ids` counts as already emitted (used when a job resumes).
        self._prefix_offset = max(len(self.ids) - 5, 0)
        self._read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes ("" while held back)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            piece = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return piece
        return ""
