"""Stop strings that are never half-streamed.

Text is released only when no stop string could still start inside it: the
longest tail of the pending text that is a prefix of some stop string is held
back until the next piece decides it. When a stop string appears, the text
before it is released and generation ends; the stop string itself is not
returned (as OpenAI does).
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._pending

    def feed(self, piece: str) -> str:
        """Add a piece of text; return what may be released now ("" while held)."""
        if not self._stops:
            return piece
        if self.stopped:
            return ""
        text = self._pending + piece
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[: min(hits)]
        keep = self._partial_tail(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _partial_tail(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest

    def flush(self) -> str:
        """Generation ended without a stop string: release what was held."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text
