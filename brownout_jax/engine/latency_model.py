"""Predicted execution time of each compiled step, per (phase, ladder level, shape bucket):
measured before serving, then corrected online. No JAX: the controller uses it on the host.

Base: for every step compiled before serving starts, the median of a few timed executions on
random tokens (the first execution, which pays XLA:CPU's lazy runtime set-up, is never among
them; random tokens, because identical ones would all route to the same experts and make
every brownout level look alike). Online: each step's measured execution time updates a
correction factor of its (phase, bucket), shared by every level — an EWMA of measured / base —
so a slower machine, a noisy neighbour, or fewer real rows than the bucket holds are learned
within a few steps for all levels at once. A bucket not run yet starts from its phase's
correction (an EWMA over all its buckets): a machine-wide slowdown carries over to shapes the
load has not reached yet.

The SLOs bound a P90, not a mean: the model also keeps an EWMA of the squared relative
deviation of each measured step from its prediction, per phase, and ``predict_p90`` adds
1.28 of its root (the normal distribution's 90th percentile) — steps that vary by 10 % are
predicted 13 % above their mean.

A step without a base (compiled later, in the background) is predicted from the nearest
measured level of the same phase and bucket, the next higher level first (browning out less
never makes a step faster, so that errs on the safe side); its first measured execution then
becomes its base.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.phase import Phase

P90_Z = 1.2816  # standard normal 90th percentile


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyEntry:
    """One row of the table ``stats()`` and GetStatus show."""

    phase: Phase
    level: float
    bucket: Bucket
    base_s: float  # measured before serving (or first seen while serving)
    correction: float  # EWMA of measured / base for this (phase, bucket)
    spread: float = 0.0  # relative standard deviation of the phase's steps (EWMA)

    @property
    def predicted_s(self) -> float:
        return self.base_s * self.correction

    @property
    def predicted_p90_s(self) -> float:
        return self.predicted_s * (1.0 + P90_Z * self.spread)


class LatencyModel:
    def __init__(self, alpha: float = 0.3):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        self.alpha = alpha
        self._base: dict[tuple[Phase, float, Bucket], float] = {}
        self._correction: dict[tuple[Phase, Bucket], float] = {}
        self._phase_correction: dict[Phase, float] = {}
        self._variance: dict[Phase, float] = {}  # EWMA of (measured / predicted - 1)²

    def set_base(self, phase: Phase, level: float, bucket: Bucket, samples_s: list[float]) -> None:
        """The median of timed executions of one step (the first run excluded by the caller)."""
        if not samples_s or min(samples_s) <= 0:
            raise ValueError(f"latency samples must be positive, got {samples_s}")
        self._base[(phase, level, bucket)] = statistics.median(samples_s)

    def _base_of(self, phase: Phase, level: float, bucket: Bucket) -> float | None:
        exact = self._base.get((phase, level, bucket))
        if exact is not None:
            return exact
        levels = sorted(lv for (ph, lv, bk) in self._base if ph == phase and bk == bucket)
        if not levels:
            return None
        higher = [lv for lv in levels if lv > level]
        return self._base[(phase, higher[0] if higher else levels[-1], bucket)]

    def predict(self, phase: Phase, level: float, bucket: Bucket) -> float | None:
        """Seconds one execution of this step is expected to take; None: nothing known."""
        base = self._base_of(phase, level, bucket)
        if base is None:
            return None
        return base * self.correction(phase, bucket)

    def predict_p90(self, phase: Phase, level: float, bucket: Bucket) -> float | None:
        """The 90th percentile of this step's execution time, as the SLO windows see it."""
        mean = self.predict(phase, level, bucket)
        return None if mean is None else mean * (1.0 + P90_Z * self.spread(phase))

    def spread(self, phase: Phase) -> float:
        """Relative standard deviation of the phase's steps around their predictions."""
        return math.sqrt(self._variance.get(phase, 0.0))

    def observe(self, phase: Phase, level: float, bucket: Bucket, seconds: float) -> None:
        """A measured execution time; the first one of an unmeasured step becomes its base."""
        if not seconds > 0:
            return
        base = self._base.get((phase, level, bucket))
        if base is None:
            self._base[(phase, level, bucket)] = seconds / self.correction(phase, bucket)
            return
        ratio, keep = seconds / base, 1 - self.alpha
        key = (phase, bucket)
        before = self.correction(phase, bucket)
        deviation = ratio / before - 1.0
        variance = self._variance.get(phase, 0.0)
        self._variance[phase] = keep * variance + self.alpha * deviation * deviation
        self._correction[key] = keep * before + self.alpha * ratio
        overall = self._phase_correction.get(phase, 1.0)
        self._phase_correction[phase] = keep * overall + self.alpha * ratio

    def correction(self, phase: Phase, bucket: Bucket) -> float:
        """measured / base for this (phase, bucket); its phase's when it has not run yet."""
        own = self._correction.get((phase, bucket))
        return self._phase_correction.get(phase, 1.0) if own is None else own

    def table(self) -> tuple[LatencyEntry, ...]:
        return tuple(
            LatencyEntry(
                phase, level, bucket, base, self.correction(phase, bucket), self.spread(phase)
            )
            for (phase, level, bucket), base in sorted(self._base.items())
        )
