"""Incremental detokenization: text deltas for streaming, and stop strings."""

from __future__ import annotations


class IncrementalText:
    """Turns a growing list of generated ids into text deltas.

    Text that might still become a stop string (up to the longest stop string minus one
    character) or an incomplete UTF-8 sequence (a trailing U+FFFD) is held back until it is
    settled, so a stop string never leaks to the client.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._emitted = 0
        self.text = ""

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """(delta, stopped): the newly settled text; stopped when a stop string appeared (the
        text is cut before it)."""
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self._take(len(self.text)), True
        self.text = text
        settled = len(text) - self._holdback
        while settled > self._emitted and text[settled - 1] == "\ufffd":
            settled -= 1
        return self._take(max(settled, self._emitted)), False

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta
