"""What crosses between the processes of one engine: the per-step plan message, and each
process's description checked against the leader's at start. Host-only (NumPy, no JAX).

A step's plan reaches the followers as one int32 buffer: a header, then the step's own input
words (the ``InputLayout`` upload every process feeds to the same executable), at most the
grid's longest upload (``capacity``). Everything a step computes from is in those words
(tokens, positions, block tables, slots, sampling parameters and seeds, exact-row flags); the
executable is named by its index in the grid's compilation order, which every process derives
from the same config.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

MAGIC = 0x424E5057  # "BNPW": a buffer that is not a plan (a desynchronised peer) is refused
HEADER_WORDS = 6  # magic, op, step (low, high), executable index, words used


class PlanOp(enum.IntEnum):
    STEP = 1  # run executable ``key_index`` on ``words``
    SHUTDOWN = 2  # the leader has drained: leave the loop and exit cleanly


class PlanWireError(ValueError):
    """A received buffer that is not a well-formed plan."""


@dataclasses.dataclass(frozen=True, slots=True)
class PlanMessage:
    op: PlanOp
    step: int  # the leader's step counter (monotonic; 0 for the non-step ops)
    key_index: int = -1  # index into StepGrid.keys(); -1 when op is not STEP
    words: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))


def buffer_words(capacity: int) -> int:
    """The longest plan's length, for step uploads of at most ``capacity`` words."""
    return HEADER_WORDS + capacity


def encode(message: PlanMessage, capacity: int, out: np.ndarray | None = None) -> np.ndarray:
    """The message as int32 words: its header and words, written into the front of ``out``
    (``buffer_words(capacity)`` long) when given; what follows them there is left as is."""
    words = np.asarray(message.words, np.int32).reshape(-1)
    if len(words) > capacity:
        raise PlanWireError(f"a step upload of {len(words)} words exceeds the {capacity} sent")
    if message.op != PlanOp.STEP and len(words):
        raise PlanWireError(f"a {message.op.name} message carries no words")
    buffer = np.zeros(buffer_words(capacity), np.int32) if out is None else out
    step = np.asarray([message.step], np.int64).view(np.int32)
    header = (MAGIC, int(message.op), step[0], step[1], message.key_index, len(words))
    buffer[:HEADER_WORDS] = header
    buffer[HEADER_WORDS : HEADER_WORDS + len(words)] = words
    return buffer[: HEADER_WORDS + len(words)]


def decode(buffer: np.ndarray) -> PlanMessage:
    """The message in a received buffer; raises ``PlanWireError`` when it is not one."""
    buffer = np.asarray(buffer)
    if buffer.dtype != np.int32 or buffer.ndim != 1 or len(buffer) < HEADER_WORDS:
        raise PlanWireError(f"a plan is 1-D int32 of ≥ {HEADER_WORDS} words, got {buffer.shape}")
    magic, op, low, high, key_index, used = (int(v) for v in buffer[:HEADER_WORDS])
    if magic != MAGIC:
        raise PlanWireError(f"not a plan (magic {magic:#x})")
    try:
        op = PlanOp(op)
    except ValueError:
        raise PlanWireError(f"unknown plan op {op}") from None
    if not 0 <= used <= len(buffer) - HEADER_WORDS:
        raise PlanWireError(f"the plan claims {used} words in a buffer of {len(buffer)}")
    if op == PlanOp.STEP and key_index < 0:
        raise PlanWireError("a step plan names no executable")
    step = int(np.asarray([low, high], np.int32).view(np.int64)[0])
    words = buffer[HEADER_WORDS : HEADER_WORDS + used].copy()
    return PlanMessage(op, step, key_index, words)


def first_difference(leader: dict[str, str], mine: dict[str, str]) -> str | None:
    """The first field (sorted) whose value differs between two processes' descriptions, or
    that only one of them has; None when they agree."""
    for field in sorted(leader.keys() | mine.keys()):
        if leader.get(field) != mine.get(field):
            return field
    return None


def mismatch_message(field: str, process: int, leader: dict[str, str], mine: dict[str, str]):
    return (
        f"process {process} does not match process 0 in {field}: "
        f"{mine.get(field, '(absent)')} on process {process}, "
        f"{leader.get(field, '(absent)')} on process 0 "
        "(every process must serve the same checkpoint with the same engine flags)"
    )
