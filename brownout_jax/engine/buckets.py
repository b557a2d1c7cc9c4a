"""Shape buckets: the one rule that chooses every jitted step's static shapes. No JAX.

A dimension's buckets are a geometric series ``start · growth^k``; a need is padded up to the
smallest bucket that holds it. Few distinct shapes mean few compilations. The engine clamps
its series at the largest size it serves (``geometric``); offline generation, scoring and
distillation pad to an open-ended series (``padded_size``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from brownout_jax.engine.phase import Phase


def geometric(start: int, stop: int, growth: int) -> tuple[int, ...]:
    """start, growth·start, … up to stop, the last one clamped to stop (a bucket past the
    largest shape would only pad)."""
    out = [start]
    while out[-1] < stop:
        out.append(out[-1] * growth)
    out[-1] = max(start, stop)
    return tuple(out)


def pick(sizes: tuple[int, ...], need: int) -> int:
    """The smallest bucket ≥ need."""
    for size in sizes:
        if size >= need:
            return size
    raise ValueError(f"no bucket holds {need} (buckets: {sizes})")


def padded_size(need: int, minimum: int = 16, growth: int = 2) -> int:
    """The smallest ``minimum · growth^k`` ≥ need (the open-ended series)."""
    size = minimum
    while size < need:
        size *= growth
    return size


def right_padded(
    sequences: Sequence[Sequence[int]], rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (rows, padded_size(longest)), lengths (rows,)), int32: the sequences
    right-padded with zeros; rows past them (``rows`` > their number) empty, length 0."""
    rows = len(sequences) if rows is None else rows
    tokens = np.zeros((rows, padded_size(max(len(s) for s in sequences))), np.int32)
    lengths = np.zeros(rows, np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, : len(seq)] = seq
        lengths[i] = len(seq)
    return tokens, lengths


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Bucket:
    """One static step shape: prefill (rows, padded tokens per row); decode (rows, block-table
    width in blocks)."""

    batch: int
    size: int

    @property
    def cost(self) -> int:
        return self.batch * self.size


@dataclasses.dataclass(frozen=True, slots=True)
class EngineBuckets:
    """The engine's bucket grid. The block-table width of a prefill covers its length (or,
    with chunked prefill, the whole sequence)."""

    prefill_batches: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_widths: tuple[int, ...]
    block_size: int
    # Block-table width of every prefill step (chunked prefill: the whole sequence's);
    # None: the prefill's own length in blocks (a prompt prefilled in one step).
    prefill_table_width: int | None = None

    def prefill_width(self, length: int) -> int:
        if self.prefill_table_width is not None:
            return self.prefill_table_width
        return -(-length // self.block_size)

    def grid(self, phase: Phase) -> tuple[Bucket, ...]:
        """Every bucket of a phase, smallest first."""
        if phase == Phase.PREFILL:
            batches, sizes = self.prefill_batches, self.prefill_lengths
        else:
            batches, sizes = self.decode_batches, self.decode_widths
        return tuple(sorted((Bucket(b, s) for b in batches for s in sizes), key=_by_cost))

    def covering(self, phase: Phase) -> Bucket:
        """The one bucket every step of the phase fits by padding up: prefill one prompt of
        the longest length (larger batches are admitted once their buckets exist), decode
        every slot at the widest block table."""
        if phase == Phase.PREFILL:
            return Bucket(self.prefill_batches[0], self.prefill_lengths[-1])
        return Bucket(self.decode_batches[-1], self.decode_widths[-1])

    def fit(self, phase: Phase, rows: int, size: int) -> Bucket:
        """The smallest bucket of the full grid holding ``rows`` × ``size``."""
        if phase == Phase.PREFILL:
            return Bucket(pick(self.prefill_batches, rows), pick(self.prefill_lengths, size))
        return Bucket(pick(self.decode_batches, rows), pick(self.decode_widths, size))


def cheapest_fit(usable, rows: int, size: int) -> Bucket | None:
    """The cheapest of ``usable`` buckets holding ``rows`` × ``size`` (None if none does)."""
    fitting = [b for b in usable if b.batch >= rows and b.size >= size]
    return min(fitting, key=_by_cost) if fitting else None


def _by_cost(bucket: Bucket) -> tuple[int, int, int]:
    return (bucket.cost, bucket.batch, bucket.size)
