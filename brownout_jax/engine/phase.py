"""The two kinds of engine step, and the brownout thresholds in force for each. No JAX."""

from __future__ import annotations

import dataclasses
import enum


class Phase(enum.StrEnum):
    PREFILL = "prefill"  # waiting prompts → their first token: the TTFT side
    DECODE = "decode"  # one token for every running sequence: the TPOT side

    @property
    def other(self) -> Phase:
        return Phase.DECODE if self is Phase.PREFILL else Phase.PREFILL


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Thresholds:
    """Brownout thresholds (ladder levels) of the two phases; 1.0 is the exact model."""

    prefill: float = 1.0
    decode: float = 1.0

    def of(self, phase: Phase) -> float:
        return self.prefill if phase == Phase.PREFILL else self.decode

    def with_level(self, phase: Phase, level: float) -> Thresholds:
        if phase == Phase.PREFILL:
            return dataclasses.replace(self, prefill=level)
        return dataclasses.replace(self, decode=level)


EXACT = Thresholds()
