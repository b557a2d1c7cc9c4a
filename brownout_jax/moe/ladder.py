"""The brownout threshold ladder: the levels steps are compiled for. No JAX."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class ThresholdLadder:
    """The thresholds step functions are compiled for; switching among them compiles nothing."""

    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("ladder: at least one level is required")
        if any(not 0.0 <= t <= 1.0 for t in self.levels):
            raise ValueError(f"ladder: levels must lie in [0, 1], got {self.levels}")
        if tuple(sorted(set(self.levels))) != self.levels:
            raise ValueError(f"ladder: levels must be increasing and distinct, got {self.levels}")
        if self.levels[-1] != 1.0:
            raise ValueError("ladder: the top level must be 1.0 (the exact model)")

    def snap(self, threshold: float) -> float:
        """The highest level ≤ ``threshold`` (snapping down keeps latency promises)."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
        below = [t for t in self.levels if t <= threshold + 1e-9]
        return below[-1] if below else self.levels[0]

    def snap_up(self, threshold: float) -> float:
        """The lowest level ≥ ``threshold`` (recovery must be able to climb a coarse ladder)."""
        above = [t for t in self.levels if t >= threshold - 1e-9]
        return above[0] if above else self.levels[-1]

    @classmethod
    def parse(cls, text: str) -> ThresholdLadder:
        try:
            return cls(tuple(sorted(float(t) for t in text.split(",") if t.strip())))
        except ValueError as err:
            raise ValueError(f"ladder: {err}") from err


DEFAULT_LADDER = ThresholdLadder(tuple(round(0.1 * i, 1) for i in range(11)))
