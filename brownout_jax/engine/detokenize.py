"""Incremental detokenization: text deltas for streaming, and stop strings. No JAX.

Decoding a request's whole generated list for every new token costs O(length) per token; a
200-token answer at batch 16 made it most of the engine thread's host time per step. Instead
each update decodes a small window: the ids from ``prefix`` on, where ``prefix`` is where the
text was last settled but one (the idea of vLLM's and TGI's incremental detokenizers). The
text of ``ids[prefix:read]`` is known, so the window's decode minus that text is the text of
the ids since ``read``; once it no longer ends in U+FFFD (an incomplete UTF-8 sequence of a
byte-level vocabulary) it is settled and the window moves on. Settled points are where a
character ended, where a decode splits: decoding the whole list gives the same text. One
token of context before the new ids keeps decoders whose output depends on the first token of
a decode (SentencePiece drops its leading space) the same as within the whole list.

A tokenizer that rewrites text across tokens (``clean_up_tokenization_spaces``), or a window
that does not extend the text decoded before (checked every update), falls back to decoding
the whole list: slower, never different.
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"


def _window_decoder(tokenizer):
    """``decode(ids)`` for windows, or None where only the whole list decodes exactly. A
    ``tokenizers`` backend is called directly: the transformers wrapper around it costs more
    than the decode of a few ids, and adds only the cleanup (then not windowed)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and _overrides_decode(type(tokenizer)):
        backend = None
    if _cleans_up(tokenizer, backend):
        return None
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def _cleans_up(tokenizer, backend) -> bool:
    """Whether ``tokenizer.decode`` rewrites spaces around punctuation: text that depends on
    the characters before it, across any window's edge."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    # transformers 5 ignores the flag for BPE vocabularies (many byte-level checkpoints set
    # it) unless forced; the forcing attribute exists only where it does so.
    forced = getattr(
        tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", None
    )
    bpe = backend is not None and type(backend.model).__name__ == "BPE"
    return not (bpe and forced is False)


def _overrides_decode(cls: type) -> bool:
    """Whether a subclass below the class that provides the backend rewrites its decode."""
    for klass in cls.__mro__:
        if "backend_tokenizer" in vars(klass):
            return False
        if "decode" in vars(klass) or "_decode" in vars(klass):
            return True
    return True


class IncrementalText:
    """Turns a growing list of generated ids into text deltas.

    Text that might still become a stop string (up to the longest stop string minus one
    character) or an incomplete UTF-8 sequence (a trailing U+FFFD) is held back until it is
    settled, so a stop string never leaks to the client. The text and the moments it is given
    out are those of decoding the whole list at every update; only the work is per token.

    Positions are in characters of the whole text. ``_buf`` holds the settled text from
    ``_base`` on: what is not given out yet, and the tail a stop string may still end in.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self._decode = None if tokenizer is None else _window_decoder(tokenizer)
        self._prefix = 0  # ids[:_prefix] are behind the window
        self._read = 0  # ids[:_read] are settled text
        self._prefix_text = ""  # the decode of ids[_prefix:_read]
        self._base = 0
        self._buf = ""
        self._settled = 0  # characters of settled text
        self._search = 0  # where a stop string not yet found may start
        self._emitted = 0
        self._text = ""  # the whole text from _base on, as of the last update

    def update(self, token_ids: list[int]) -> tuple[str, bool]:
        """(delta, stopped): the newly settled text; stopped when a stop string appeared (the
        text is cut before it)."""
        if self.tokenizer is None:
            return "", False
        if self._decode is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            self._base, self._settled, self._search = 0, len(text), 0
        else:
            text = self._advance(token_ids)
        self._text = text
        if self.stop:
            start = self._search - self._base
            hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self._text = text[: min(hits)]
                return self._take(self._base + len(self._text)), True
        # Settled text that starts before this cannot hold a stop string not yet found.
        self._search = max(self._settled - self._holdback, 0)
        end = self._base + len(text) - self._holdback
        while end > self._emitted and text[end - self._base - 1] == _INCOMPLETE:
            end -= 1
        return self._take(end), False

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        return self._take(self._base + len(self._text))

    def _advance(self, token_ids: list[int]) -> str:
        """Settles what the new ids completed; returns the whole text from ``_base`` on."""
        keep = min(self._emitted, self._search)
        if keep > self._base:  # given out, and too early to hold a stop string: forgotten
            self._buf = self._buf[keep - self._base :]
            self._base = keep
        window = self._decode(token_ids[self._prefix :])
        known = self._prefix_text
        if not window.startswith(known):  # the decoder is not windowable: the whole list
            self._decode = None
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            self._buf = text[self._base :]
            self._settled = len(text)
            return self._buf
        new = window[len(known) :]
        if not new or new[-1] == _INCOMPLETE:
            return self._buf + new
        self._buf += new
        self._settled += len(new)
        self._prefix, self._read = self._read, len(token_ids)
        self._prefix_text = self._decode(token_ids[self._prefix : self._read])
        return self._buf

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted - self._base : end - self._base]
        self._emitted = end
        return delta
