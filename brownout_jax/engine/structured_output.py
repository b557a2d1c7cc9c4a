"""Structured output through xgrammar: specs compiled to grammars, per-request token bitmasks.

Data flow: a front validates a request's ``StructuredOutput`` by compiling it
(:meth:`StructuredOutputCompiler.compile`, cached, safe from any thread); the engine makes one
:class:`StructuredMatcher` per request from the cached grammar; between steps the host writes
each constrained row's allowed tokens into the step's ``[B, M]`` int32 mask
(:meth:`StructuredMatcher.fill_mask`, all-ones rows for unconstrained requests), the compiled
step masks the logits with :func:`apply_token_bitmask` before sampling, and the sampled token
goes back through :meth:`StructuredMatcher.accept`.

Mask layout (xgrammar's own, checked against its ``apply_token_bitmask_inplace`` in the
tests): ``M = ceil(V / 32)`` int32 words per row, token ``32 * i + j`` allowed iff bit ``j``
(least significant first) of word ``i`` is set. Bits past ``V`` in the last word are 0.

xgrammar is an optional dependency (``pip install 'brownout-jax[structured]'``): it imports
torch, which the base install does not carry. Without it the module still imports, and a
request asking for structured output is refused naming ``response_format``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import threading
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from brownout_jax.engine.requests import RequestError, StructuredKind, StructuredOutput
from brownout_jax.model.dims import Array, Float, Int

FIELD = "structured"  # GenerationRequest's; the fronts rename it to what the client sent
INSTALL_HINT = "pip install 'brownout-jax[structured]'"
_MESSAGE_CHARS = 300
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and may carry a
# "Check failed: (expr) is false: " clause: neither means anything to a client.
_LOG_PREFIX = re.compile(r"^\[[\d:.]+\]\s+\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is false:\s*")


def mask_words(vocab_size: int) -> int:
    """Int32 words per mask row: ``ceil(vocab_size / 32)``."""
    return -(-vocab_size // 32)


def all_allowed(batch: int, vocab_size: int) -> np.ndarray:
    """A ``[batch, W]`` mask allowing every token (rows without a grammar)."""
    return np.full((batch, mask_words(vocab_size)), -1, np.int32)


def token_mask(token_ids: Sequence[int], words: int) -> np.ndarray:
    """A mask row of ``words`` words allowing exactly ``token_ids``."""
    bits = np.zeros(words * 32, np.uint8)
    bits[np.asarray(token_ids, np.int64)] = 1
    return np.packbits(bits, bitorder="little").view("<i4").astype(np.int32)


@dataclasses.dataclass(frozen=True, slots=True)
class StructuredConfig:
    # Compiled grammars are kept by total size, not count: at a 152k vocabulary one schema's
    # token-mask cache can take MBs while a regex takes KBs.
    cache_bytes: int = 256 << 20
    # Threads xgrammar compiles one grammar with; its docs advise half the virtual cores,
    # and the engine loop and the fronts need the rest.
    max_threads: int = max(1, min(8, (os.cpu_count() or 2) // 2))
    # False: JSON with fixed separators (", " and ": ") and no free whitespace. Free
    # whitespace lets a weak model loop on spaces and newlines without ever closing the object.
    any_whitespace: bool = False


class StructuredMatcher:
    """One request's grammar state. Not thread-safe: the engine thread alone drives it."""

    __slots__ = ("_finished", "_matcher", "_scratch", "_stop_ids", "_stop_row")

    def __init__(self, matcher, stop_ids: Sequence[int], words: int):
        self._matcher = matcher
        self._stop_ids = tuple(sorted(set(stop_ids)))
        self._stop_row = token_mask(self._stop_ids, words)
        self._scratch = np.empty(words, np.int32)
        self._finished: bool | None = None  # cached per state; None: not yet known

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def fill_mask(self, row: np.ndarray) -> None:
        """Writes the next token's allowed set into ``row`` (int32, length W, contiguous: a
        view into the step's input buffer). Once the grammar has taken its stop token the
        row allows the stop tokens alone, so a row the loop has not retired yet stays valid."""
        words = self._stop_row.shape[0]
        if row.shape != (words,) or row.dtype != np.int32 or not row.flags.c_contiguous:
            raise ValueError(
                f"mask row must be contiguous int32 of shape ({words},), got "
                f"{row.dtype} {row.shape}"
            )
        if self._matcher.is_terminated():
            row[:] = self._stop_row
            return
        # DLPack straight into the caller's NumPy memory: no torch tensor, no copy.
        self._matcher.fill_next_token_bitmask(row)

    def accept(self, token_id: int) -> bool:
        """Advances by ``token_id``; False (state unchanged) if the grammar refuses it. A stop
        token is accepted once the grammar is complete and terminates the matcher."""
        self._finished = None
        return bool(self._matcher.accept_token(int(token_id)))

    @property
    def terminated(self) -> bool:
        """A stop token was accepted: nothing more may follow."""
        return bool(self._matcher.is_terminated())

    @property
    def finished(self) -> bool:
        """The text is complete and only a stop token may follow (or one was taken): the
        request may end here without sampling the stop token."""
        if self._finished is None:
            self._finished = self._matcher.is_terminated() or (
                self._matcher.is_completed() and self._only_stop_allowed()
            )
        return self._finished

    def _only_stop_allowed(self) -> bool:
        # A complete text may still be extended (regex "a+" after "a"): look at the mask.
        self._matcher.fill_next_token_bitmask(self._scratch)
        return not (self._scratch & ~self._stop_row).any()


class StructuredOutputCompiler:
    """Compiles ``StructuredOutput`` specs for one (tokenizer, vocab_size); one per engine.

    Thread-safe: xgrammar's compile functions release the GIL and may run concurrently (its
    docs compile from several threads at once); this class's cache takes a lock only around
    its own bookkeeping. Two threads compiling one new spec both compile it and one result is
    kept. xgrammar (and torch with it) is imported on the first compile, so that a server
    with no structured requests neither pays the ~2 s import nor needs the package.
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        stop_token_ids: Sequence[int] | None = None,
        config: StructuredConfig = StructuredConfig(),
    ):
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self.config = config
        self._tokenizer = tokenizer
        self._stop_ids = None if stop_token_ids is None else tuple(stop_token_ids)
        self._lock = threading.Lock()
        self._backend = None  # (xgrammar module, its GrammarCompiler, stop ids), made once
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_bytes = 0

    def compile(self, structured: StructuredOutput):
        """The compiled grammar for ``structured`` (opaque; pass it to :meth:`matcher`).
        Raises :class:`RequestError` naming ``response_format`` if the spec is refused."""
        with self._lock:
            hit = self._cache.get(structured)
            if hit is not None:
                self._cache.move_to_end(structured)
                return hit
        xgr, compiler, _ = self._ready()
        compiled = self._compile(xgr, compiler, structured)
        self._remember(structured, compiled)
        return compiled

    def matcher(self, structured: StructuredOutput) -> StructuredMatcher:
        """A fresh matcher for one request (compiles, or takes the cached grammar)."""
        compiled = self.compile(structured)
        xgr, _, stop_ids = self._ready()
        return StructuredMatcher(
            xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids)),
            stop_ids,
            self.words,
        )

    def prepare(self) -> bool:
        """Imports xgrammar and reads the tokenizer now (seconds at a 152k vocabulary) rather
        than on the first structured request; False if structured output cannot be served."""
        try:
            self._ready()
        except RequestError:
            return False
        return True

    @property
    def cached_bytes(self) -> int:
        return self._cache_bytes

    def _ready(self):
        with self._lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def _make_backend(self):
        if self._tokenizer is None:
            raise RequestError(FIELD, "structured output needs the model's tokenizer")
        try:
            import xgrammar as xgr
        except ImportError:
            raise RequestError(
                FIELD, f"structured output needs xgrammar, not installed: {INSTALL_HINT}"
            ) from None
        # vocab_size may exceed the tokenizer's (padded embeddings): the ids past it are
        # never allowed.
        info = xgr.TokenizerInfo.from_huggingface(
            self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_ids
        )
        compiler = xgr.GrammarCompiler(
            info,
            max_threads=self.config.max_threads,
            cache_enabled=False,  # ours is the one cache, bounded by bytes
        )
        return xgr, compiler, tuple(info.stop_token_ids)

    def _compile(self, xgr, compiler, structured: StructuredOutput):
        kind, spec = structured.kind, structured.spec
        if kind is StructuredKind.JSON_SCHEMA:
            try:
                json.loads(spec)
            except json.JSONDecodeError as error:
                raise RequestError(FIELD, f"JSON schema is not valid JSON: {error}") from None
        if kind is StructuredKind.CHOICE and not structured.choices:
            raise RequestError(FIELD, "choice needs at least one alternative")
        whitespace = self.config.any_whitespace
        try:
            if kind is StructuredKind.JSON_OBJECT:
                # Non-strict: any members, any values (the builtin JSON grammar also takes
                # arrays, which json_object does not).
                return compiler.compile_json_schema(
                    '{"type": "object"}', strict_mode=False, any_whitespace=whitespace
                )
            if kind is StructuredKind.JSON_SCHEMA:
                return compiler.compile_json_schema(spec, any_whitespace=whitespace)
            if kind is StructuredKind.REGEX:
                return compiler.compile_regex(spec)
            if kind is StructuredKind.CHOICE:
                # JSON string escapes are EBNF literal escapes: quotes, backslashes and
                # control characters in a choice stay literal.
                alternatives = " | ".join(
                    json.dumps(c, ensure_ascii=False) for c in structured.choices
                )
                return compiler.compile_grammar(f"root ::= {alternatives}")
            if kind is StructuredKind.GRAMMAR:
                return compiler.compile_grammar(spec)
        except (RuntimeError, ValueError, TypeError) as error:
            raise RequestError(FIELD, f"invalid {kind.value}: {_one_line(error)}") from None
        raise RequestError(FIELD, f"unknown structured output kind {kind!r}")

    def _remember(self, key: StructuredOutput, compiled) -> None:
        size = int(compiled.memory_size_bytes)
        with self._lock:
            if key in self._cache:  # another thread compiled it meanwhile
                return
            self._cache[key] = compiled
            self._cache_bytes += size
            # The newest entry stays even if it alone exceeds the budget: it is in use.
            while self._cache_bytes > self.config.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= int(old.memory_size_bytes)


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", lines[0] if lines else type(error).__name__))
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def apply_token_bitmask(
    logits: Float[Array, "B V"], mask: Int[Array, "B M"]
) -> Float[Array, "B V"]:
    """Logits of tokens whose mask bit is 0 become -inf; rows of all ones are unchanged.
    ``M * 32 ≥ V``: bits past V are ignored. Jit-friendly (static shapes, one fusion)."""
    vocab, words = logits.shape[-1], mask.shape[-1]
    if words * 32 < vocab:
        raise ValueError(f"mask of {words} words covers {words * 32} < {vocab} tokens")
    needed = mask_words(vocab)
    shifts = jnp.arange(32, dtype=jnp.int32)
    # Arithmetic shift of a negative word fills with ones; the & 1 keeps only bit j.
    bits = (mask[:, :needed, None].astype(jnp.int32) >> shifts) & 1  # [B, needed, 32]
    allowed = bits.reshape(mask.shape[0], needed * 32)[:, :vocab] != 0
    return jnp.where(allowed, logits, jnp.asarray(-jnp.inf, logits.dtype))


def apply_token_bitmask_numpy(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`apply_token_bitmask` (unpacks the words' little-endian bytes)."""
    vocab = logits.shape[-1]
    as_bytes = np.ascontiguousarray(mask, dtype="<i4").view(np.uint8)
    allowed = np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, :vocab].astype(bool)
    return np.where(allowed, logits, np.asarray(-np.inf, logits.dtype))
