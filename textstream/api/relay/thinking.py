"""Reasoning text apart from the answer: `<think>...</think>` at the start of a
completion (DeepSeek-R1, Qwen3, SmolLM3 and others write it so; an upstream's
`reasoning_content` deltas arrive wrapped the same way, engines/openai.py).

Workers publish the raw text (a takeover resumes from it); the API splits it as
it relays, so every reader, a resumed one included, sees the same split:
`thinking` events on /completion and /jobs, `delta.reasoning_content` on chat
completions. Text that could still turn out to be a tag is held back until the
next piece decides it, as stop strings are.
"""

from __future__ import annotations

from typing import Literal

OPEN, CLOSE = "<think>", "</think>"
Kind = Literal["thinking", "answer"]


class ThinkSplitter:
    """Raw completion text in, (kind, text) pieces out."""

    def __init__(self) -> None:
        self._state: Literal["start", "thinking", "answer"] = "start"
        self._held = ""
        #: Just after </think>: the newlines that separate it from the answer go.
        self._after_block = False

    @property
    def undecided(self) -> bool:
        """Nothing decided yet (the text so far could still open a think block)."""
        return self._state == "start"

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        if self._state == "answer":
            if self._after_block:
                text = text.lstrip("\n")
                self._after_block = not text
            return [("answer", text)] if text else []
        self._held += text
        out: list[tuple[Kind, str]] = []
        if self._state == "start":
            stripped = self._held.lstrip()
            if stripped.startswith(OPEN):
                self._state, self._held = "thinking", stripped[len(OPEN) :]
            elif OPEN.startswith(stripped):
                return []  # "", "  <th": could still open a block
            else:
                self._state, held, self._held = "answer", self._held, ""
                return [("answer", held)]
        end = self._held.find(CLOSE)
        if end >= 0:
            thought, rest = self._held[:end], self._held[end + len(CLOSE) :].lstrip("\n")
            self._state, self._held, self._after_block = "answer", "", not rest
            out += [("thinking", thought)] if thought else []
            return out + ([("answer", rest)] if rest else [])
        keep = _partial_tail(self._held, CLOSE)
        thought, self._held = (
            self._held[: len(self._held) - keep],
            self._held[len(self._held) - keep :],
        )
        return [("thinking", thought)] if thought else []

    def flush(self) -> list[tuple[Kind, str]]:
        """The completion ended: whatever is held goes out as what it was."""
        held, self._held = self._held, ""
        if not held:
            return []
        return [("thinking" if self._state == "thinking" else "answer", held)]


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that begins `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
