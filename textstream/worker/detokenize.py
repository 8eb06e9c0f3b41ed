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

    def spell(self, token_id: int) -> tuple[str, list[int] | None]:
        """One token's own text (special tokens included), as logprobs name it, and
        its bytes when the text does not hold them: a piece of a character decodes
        to U+FFFD, its bytes are read from the token itself (token_bytes)."""
        text = self._tokenizer.decode(
            [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if REPLACEMENT_CHAR not in text:
            return text, None
        return text, token_bytes(self._tokenizer, token_id)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE spells each byte as one printable character: the
    inverse of its `bytes_to_unicode` table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


BYTE_LEVEL = _byte_level_alphabet()


def token_bytes(tokenizer: Decoder, token_id: int) -> list[int] | None:
    """A token's raw bytes, read from its vocabulary entry: byte-level BPE's
    characters (GPT-2, Llama 3, Qwen) or SentencePiece's `<0xHH>` byte tokens;
    None when it is neither."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(token_id) if convert is not None else None
    if not isinstance(piece, str) or not piece:
        return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return [int(piece[3:5], 16)]
        except ValueError:
            return None
    if all(ch in BYTE_LEVEL for ch in piece):
        return [BYTE_LEVEL[ch] for ch in piece]
    return None
