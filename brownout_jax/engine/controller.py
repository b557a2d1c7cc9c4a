"""SLO-aware brownout controller (host side): which ladder level each phase's steps run at.

Modes: ``off`` (always 1.0, the exact model), ``fixed=X``, ``auto`` (the predictive policy,
``engine.predictive``: per step, of the levels predicted to fit the SLO, the one giving up
least quality — ``engine.quality_costs``) and
``reactive``, BrownoutServe's rule, kept to be measured beside it:

Per-step latencies of prefill steps (the TTFT side) and decode steps (the TPOT side) are kept
with their timestamps. Every ``check_interval_s`` the P90 over the last ``window_s`` of each
phase is compared with its SLO, separately:

    P90 > SLO               → threshold × shrink (0.8)
    P90 < warning × SLO     → threshold + step (0.1), at most 1
    otherwise               → hold

and the result snaps to the ladder of compiled levels: down after a decrease, up after an
increase (so recovery can climb a coarse ladder such as 0, 0.5, 1). A phase with no step in the
window holds. The clock is injectable, so traces can be replayed without sleeping.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable, Sequence

import numpy as np

from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.predictive import PredictiveConfig, PredictivePolicy, StepView
from brownout_jax.engine.quality_costs import DEFAULT_QUALITY_COSTS, QualityCosts
from brownout_jax.moe.ladder import DEFAULT_LADDER, ThresholdLadder


class BrownoutMode(enum.StrEnum):
    AUTO = "auto"  # predictive: per step, the least quality cost predicted to fit the SLO
    REACTIVE = "reactive"  # BrownoutServe's rule: one notch per check after the window's P90
    OFF = "off"  # always 1.0, the exact model
    FIXED = "fixed"  # always fixed_threshold


@dataclasses.dataclass(frozen=True, slots=True)
class ControllerConfig:
    mode: BrownoutMode = BrownoutMode.AUTO
    fixed_threshold: float = 1.0
    slo_ttft_s: float = 1.0  # SLO of a prefill step
    slo_tpot_s: float = 0.2  # SLO of a decode step
    window_s: float = 2.0
    check_interval_s: float = 5.0
    shrink: float = 0.8
    step: float = 0.1
    warning_fraction: float = 0.8
    predictive: PredictiveConfig = PredictiveConfig()  # noqa: RUF009 (frozen)
    # Per phase and level, what browning out gives up (mode ``auto`` minimises it among the
    # levels that fit): the served united experts' stored KL, else the ladder position.
    quality: QualityCosts = DEFAULT_QUALITY_COSTS

    def __post_init__(self) -> None:
        try:  # the mode's name is accepted too (ControllerConfig(mode="off"))
            object.__setattr__(self, "mode", BrownoutMode(self.mode))
        except ValueError:
            raise ValueError(
                f"brownout mode must be auto, reactive, off or fixed=X, got {self.mode!r}"
            ) from None
        for name in ("slo_ttft_s", "slo_tpot_s", "window_s", "check_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.fixed_threshold <= 1.0:
            raise ValueError(f"fixed threshold must lie in [0, 1], got {self.fixed_threshold}")

    @classmethod
    def parse_mode(cls, text: str, **fields) -> ControllerConfig:
        """``auto``, ``reactive``, ``off`` or ``fixed=X`` (the CLI's --brownout)."""
        if text.startswith("fixed="):
            try:
                value = float(text.split("=", 1)[1])
            except ValueError as err:
                raise ValueError(f"--brownout fixed=X needs a number, got {text!r}") from err
            return cls(mode=BrownoutMode.FIXED, fixed_threshold=value, **fields)
        return cls(mode=text, **fields)

    def initial_level(self, ladder: ThresholdLadder) -> float:
        """The level both phases start at: the fixed one, else 1.0 (the exact model)."""
        if self.mode is BrownoutMode.FIXED:
            return ladder.snap(self.fixed_threshold)
        return ladder.levels[-1]

    def slo(self, phase: Phase) -> float:
        return self.slo_ttft_s if phase == Phase.PREFILL else self.slo_tpot_s


DEFAULT_CONTROLLER = ControllerConfig()


class SloController:
    def __init__(
        self,
        config: ControllerConfig,
        ladder: ThresholdLadder = DEFAULT_LADDER,
        clock: Callable[[], float] = time.monotonic,
        latency: LatencyModel | None = None,
    ):
        """``latency``: the engine's step latency model (mode ``auto`` predicts from it)."""
        self.config = config
        self.ladder = ladder
        self.clock = clock
        self.latency = LatencyModel() if latency is None else latency
        self.policy = None
        if config.mode is BrownoutMode.AUTO:
            slo = {phase: config.slo(phase) for phase in Phase}
            self.policy = PredictivePolicy(self.latency, slo, config.predictive, config.quality)
        self._samples = {phase: collections.deque() for phase in Phase}
        start = config.initial_level(ladder)
        self._thresholds = Thresholds(start, start)
        self._last_check = clock()
        self.updates = 0

    @property
    def paces_prefill(self) -> bool:
        """True when prefill steps are sized to leave decode its SLO (``auto``)."""
        return self.policy is not None and self.config.predictive.pace_prefill

    @property
    def predictive(self) -> bool:
        """True when each step's level is chosen at its dispatch (``choose``)."""
        return self.policy is not None

    def choose(
        self, view: StepView, levels: Sequence[float], other_levels: Sequence[float]
    ) -> float:
        """Mode ``auto``: the level of the step about to run, among ``levels`` (those its
        bucket can run at); it becomes the phase's threshold in force."""
        if self.policy is None:
            raise RuntimeError(f"mode {self.config.mode} does not choose levels per step")
        before = self._thresholds.of(view.phase)
        level = self.policy.choose(view, self._thresholds, levels, other_levels)
        if level != before:
            self._thresholds = self._thresholds.with_level(view.phase, level)
            self.updates += 1
        return level

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    def threshold(self, phase: Phase) -> float:
        return self._thresholds.of(phase)

    def record(self, phase: Phase, latency_s: float, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        self._samples[phase].append((now, latency_s))
        self._trim(phase, now)

    def _trim(self, phase: Phase, now: float) -> None:
        samples = self._samples[phase]
        while samples and samples[0][0] < now - self.config.window_s:
            samples.popleft()

    def window(self, phase: Phase, now: float | None = None) -> np.ndarray:
        now = self.clock() if now is None else now
        self._trim(phase, now)
        return np.asarray([latency for _, latency in self._samples[phase]], np.float64)

    def p90(self, phase: Phase, now: float | None = None) -> float | None:
        latencies = self.window(phase, now)
        return float(np.percentile(latencies, 90)) if latencies.size else None

    def attainment(self, phase: Phase, now: float | None = None) -> float | None:
        """Share of the window's steps within the phase's SLO."""
        latencies = self.window(phase, now)
        if not latencies.size:
            return None
        return float(np.mean(latencies <= self.config.slo(phase)))

    def next_threshold(self, current: float, p90: float | None, slo: float) -> float:
        """The paper's rule, snapped to the ladder."""
        cfg = self.config
        if p90 is None:
            return current
        if p90 > slo:
            return self.ladder.snap(current * cfg.shrink)
        if p90 < cfg.warning_fraction * slo:
            return self.ladder.snap_up(min(1.0, current + cfg.step))
        return current

    def maybe_update(self, now: float | None = None) -> bool:
        """Applies the rule if a check interval has passed; True if a threshold changed."""
        now = self.clock() if now is None else now
        if (
            self.config.mode is not BrownoutMode.REACTIVE
            or now - self._last_check < self.config.check_interval_s
        ):
            return False
        self._last_check = now
        before = self._thresholds
        for phase in Phase:
            new = self.next_threshold(
                before.of(phase), self.p90(phase, now), self.config.slo(phase)
            )
            self._thresholds = self._thresholds.with_level(phase, new)
        changed = self._thresholds != before
        self.updates += changed
        return changed
