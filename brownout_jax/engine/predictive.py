"""The predictive brownout policy: per step, of the levels predicted to meet the SLOs, the one
giving up least quality.

BrownoutServe's controller (mode ``reactive`` here) moves one notch every few seconds after
the P90 of the last window. Every (phase, level, bucket) step of this engine is compiled and
timed before serving (:class:`LatencyModel`), so the latency of each level for the step about
to run can be predicted, and each level's quality cost is known (:class:`QualityCosts`: the
KL stored with the united experts, else the ladder position).

What a step's latency is (what the SLO windows measure, ``EngineLoop._process``). The engine
reads step i's tokens after dispatching step i+1, and the device runs steps one after another.
A prefill step's latency is dispatch → tokens read: the rest of the step in flight, then its
own execution — its requests wait through both. A decode step's latency is the gap its
sequences see between two tokens: its own execution behind a decode step (whose tokens the
gap starts from), and behind a prefill step also that step and the wait since their last
token. ``StepView.lead_s`` is that lead before the step's own execution. A level L fits
a step when (each execution time here is a predicted 90th percentile,
``LatencyModel.predict_p90``: the SLO windows bound a P90)

- its latency, ``lead_s + exec(phase, L, bucket)``, is within ``margin · SLO(phase)``;
- the step of the other phase that follows it (a decode after a prefill while sequences run,
  a prefill after a decode while requests wait) can still fit its own SLO at that phase's
  lowest level: ``exec(phase, L) + exec(other, lowest) ≤ margin · SLO(other)``;
- prefill only: the waiting requests' TTFT — wait so far + what is in flight + the prefill
  rounds up to the one that serves each (a round: a prefill step and the decode step
  interleaved with it) — is within ``margin · SLO_ttft`` for the first ``horizon_steps``
  rounds of the queue.

Only levels worth running are candidates: in order of quality cost, each predicted at least
``min_gain`` (5 %) faster than every cheaper one (a phase whose levels time alike stays
exact). Of the fitting ones the least quality cost wins (equal costs: the higher level). If
none fits: the fewest predicted misses, and of the levels with that many the fastest (a
backlog drains fastest there; each level worth running is faster than the cheaper ones).
``count_late_requests=False`` leaves requests late at every level out of the count.
Hysteresis: giving up more quality applies at once; less only after the level has fit with
the tighter ``raise_margin`` at ``raise_after`` consecutive decisions of the phase, so a load
at the boundary does not flap between levels. Prefill pacing (``paced_prefill``): while
sequences decode, a prefill step may only take buckets that leave the decode step after it
within its SLO. Decisions read host state only (no device sync). No JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.quality_costs import DEFAULT_QUALITY_COSTS, QualityCosts


@dataclasses.dataclass(frozen=True, slots=True)
class PredictiveConfig:
    margin: float = 0.9  # a step must be predicted within margin · SLO
    raise_margin: float = 0.75  # … within raise_margin · SLO to raise the level
    raise_after: int = 3  # consecutive decisions a higher level must fit before it applies
    horizon_steps: int = 4  # prefill rounds of the queue whose TTFT is predicted
    # A waiting request whose TTFT misses the SLO even at the fastest level: True (default),
    # it counts, so a backlog past its SLO takes prefill to the lowest level — the fastest
    # drain, which serves the requests behind it sooner (measured: more goodput, fewer
    # violation periods); False, it is lost whatever the level and not counted (no brownout
    # on its behalf: a higher mean prefill threshold).
    count_late_requests: bool = True
    # A level is worth running only if it is predicted at least this much faster than every
    # level costing less quality (``worth_running``): levels that time alike, as on a model
    # whose experts are a sliver of each step, or a compute-bound prefill, would cost quality
    # for nothing.
    min_gain: float = 0.05
    # Prefill pacing: while sequences decode, a prefill step may only take a bucket that, at
    # its fastest level worth running, leaves the decode step after it within the TPOT SLO
    # (one-row buckets always: the queue's head must get in) — a burst of prompts then
    # spreads over several prefill steps instead of stalling every decoding sequence behind
    # one long step, which no brownout level of the decode step can make up.
    pace_prefill: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.raise_margin <= self.margin <= 1.0:
            raise ValueError(
                "need 0 < raise_margin ≤ margin ≤ 1, got "
                f"raise_margin={self.raise_margin}, margin={self.margin}"
            )
        if self.min_gain < 0:
            raise ValueError(f"min_gain must be ≥ 0, got {self.min_gain}")
        if self.raise_after < 1 or self.horizon_steps < 1:
            raise ValueError("raise_after and horizon_steps must be ≥ 1")


@dataclasses.dataclass(frozen=True, slots=True)
class StepView:
    """What the engine knows when it dispatches a step (host state only)."""

    phase: Phase
    bucket: Bucket
    # Predicted seconds of its latency before its own execution (``step_view.lead_s``):
    # prefill, the rest of the step in flight; decode, the longest wait of a sequence whose
    # previous token is not in flight, since that token, + the rest of the step in flight.
    lead_s: float = 0.0
    # Prefill: the waiting requests' ages, the step's own rows first, then the queue's order.
    waiting_ages_s: tuple[float, ...] = ()
    prefill_rows: int = 1  # requests one prefill step takes
    # The step of the other phase expected next (None: none): the decode step of the running
    # sequences after a prefill, the prefill of the queue's head after a decode.
    next_bucket: Bucket | None = None
    # Whether that step's rows wait through this one (False: a prefill while nothing else
    # decodes — the sequences it starts see their first gap from its tokens on).
    stalls_next: bool = True


class PredictivePolicy:
    def __init__(
        self,
        latency: LatencyModel,
        slo: dict[Phase, float],
        config: PredictiveConfig = PredictiveConfig(),
        quality: QualityCosts = DEFAULT_QUALITY_COSTS,
    ):
        self.latency = latency
        self.slo = slo
        self.config = config
        self.quality = quality
        self._streak = {phase: 0 for phase in Phase}
        self._ranks: dict[tuple[Phase, float], tuple[float, float]] = {}

    def misses(
        self,
        view: StepView,
        level: float,
        thresholds: Thresholds,
        other_levels: Sequence[float],
        margin: float,
        fastest_s: float | None = None,
        next_fastest_s: float | None = None,
        own_s: float | None = None,
    ) -> int | None:
        """Predicted SLO misses if the step runs at ``level`` (0: it fits); None: unknown.
        ``fastest_s``: the step's predicted execution at its fastest level (which requests
        are late whatever the level); ``next_fastest_s``: the next step's at its fastest of
        ``other_levels``; ``own_s``: the step's at ``level`` (each computed when not given)."""
        phase = view.phase
        own = self.latency.predict_p90(phase, level, view.bucket) if own_s is None else own_s
        if own is None:
            return None
        other = phase.other
        misses = int(view.lead_s + own > margin * self.slo[phase])
        if view.next_bucket is not None and view.stalls_next:
            if next_fastest_s is None:
                next_fastest_s = self._fastest(other, view.next_bucket, other_levels)
            if next_fastest_s is not None and own + next_fastest_s > margin * self.slo[other]:
                misses += 1
        if phase == Phase.PREFILL and view.waiting_ages_s:
            decode = 0.0  # the decode step interleaved with each prefill round
            if view.next_bucket is not None:
                decode = self.latency.predict_p90(other, thresholds.decode, view.next_bucket) or 0.0
            rows = max(1, view.prefill_rows)
            limit = margin * self.slo[phase]
            skip_late = fastest_s is not None and not self.config.count_late_requests

            def ttft(age: float, ahead: int, step: float) -> float:
                return age + view.lead_s + (ahead + 1) * step + ahead * decode

            for i, age in enumerate(view.waiting_ages_s[: rows * self.config.horizon_steps]):
                ahead = i // rows  # prefill rounds before the one that serves request i
                if skip_late and ttft(age, ahead, min(own, fastest_s)) > limit:
                    continue  # late whatever the level
                misses += int(ttft(age, ahead, own) > limit)
        return misses

    def _fastest(self, phase: Phase, bucket: Bucket, levels: Sequence[float]) -> float | None:
        known = [
            t for lv in levels if (t := self.latency.predict_p90(phase, lv, bucket)) is not None
        ]
        return min(known, default=None)

    def paced_prefill(
        self,
        buckets: Collection[Bucket],
        levels: Sequence[float],
        decode_bucket: Callable[[int], Bucket | None],
        decode_levels: Sequence[float],
    ) -> list[Bucket]:
        """The prefill buckets a step may take while sequences decode (``pace_prefill``):
        those whose step, at its fastest level worth running, leaves the decode step after it
        — of ``decode_bucket(rows it adds)``, at its fastest level — within the TPOT SLO;
        one-row buckets always (the queue's head must get in), and buckets not timed yet (as
        a step with nothing known runs at the level in force)."""
        limit = self.config.margin * self.slo[Phase.DECODE]
        decode_s: dict[int, float | None] = {}
        paced = []
        for bucket in buckets:
            times = {
                lv: t
                for lv in levels
                if (t := self.latency.predict_p90(Phase.PREFILL, lv, bucket)) is not None
            }
            if bucket.batch == 1 or not times:
                paced.append(bucket)
                continue
            if bucket.batch not in decode_s:
                after = decode_bucket(bucket.batch)
                decode_s[bucket.batch] = (
                    None if after is None else self._fastest(Phase.DECODE, after, decode_levels)
                )
            decode = decode_s[bucket.batch]
            own = min(times[lv] for lv in self.worth_running(Phase.PREFILL, times))
            if decode is None or own + decode <= limit:
                paced.append(bucket)
        return paced

    def worth_running(self, phase: Phase, times: dict[float, float]) -> list[float]:
        """The levels of ``times`` (predicted seconds of one step) worth running: in order of
        quality cost, each one predicted at least ``min_gain`` faster than every cheaper one
        kept before it. A phase whose levels time alike keeps its exact level only."""
        kept: list[float] = []
        for level in sorted(times, key=lambda lv: self._rank(phase, lv)):
            if not kept or times[level] <= (1 - self.config.min_gain) * min(
                times[lv] for lv in kept
            ):
                kept.append(level)
        return kept

    def _rank(self, phase: Phase, level: float) -> tuple[float, float]:
        """Least quality given up first; of levels costing the same, the higher."""
        rank = self._ranks.get((phase, level))
        if rank is None:  # the costs never change: each level's is worked out once
            rank = self._ranks[(phase, level)] = (self.quality.cost(phase, level), -level)
        return rank

    def choose(
        self,
        view: StepView,
        thresholds: Thresholds,
        levels: Sequence[float],
        other_levels: Sequence[float] | None = None,
    ) -> float:
        """The level the step about to run uses, among ``levels`` (those it can run at);
        ``other_levels``: those the other phase can run at (default: the same)."""
        phase = view.phase
        current = thresholds.of(phase)
        other_levels = levels if other_levels is None else other_levels
        cfg = self.config

        def rank(level: float) -> tuple[float, float]:
            return self._rank(phase, level)

        next_fastest = None
        if view.next_bucket is not None and view.stalls_next:
            next_fastest = self._fastest(phase.other, view.next_bucket, other_levels)
        # The common case, no pressure: the level costing least (the exact one) is in force
        # and fits — nothing else to weigh (the decision runs every step, so it is cheap).
        if current == min(levels, key=rank) and (phase == Phase.DECODE or cfg.count_late_requests):
            own = self.latency.predict_p90(phase, current, view.bucket)
            fits = own is not None and not self.misses(
                view, current, thresholds, other_levels, cfg.margin, None, next_fastest, own
            )
            if fits:
                self._streak[phase] = 0
                return current

        times = {
            lv: t
            for lv in levels
            if (t := self.latency.predict_p90(phase, lv, view.bucket)) is not None
        }
        if not times:
            return current
        fastest = min(times.values())

        def count(level: float, margin: float) -> int | None:
            return self.misses(
                view, level, thresholds, other_levels, margin, fastest, next_fastest, times[level]
            )

        known = {
            lv: m
            for lv in self.worth_running(phase, times)
            if (m := count(lv, cfg.margin)) is not None
        }
        if not known:
            return current
        fitting = [lv for lv, m in known.items() if m == 0]
        if fitting:  # the least quality given up among the levels that fit
            target = min(fitting, key=rank)
        else:  # the fewest misses; of those the fastest, where a backlog drains fastest
            fewest = min(known.values())
            target = min((lv for lv, m in known.items() if m == fewest), key=lambda lv: times[lv])
        if current not in known or rank(target) >= rank(current):
            self._streak[phase] = 0
            return target
        # Giving less up: only for a level that fits comfortably, and only once it has several
        # times in a row (a load at the boundary keeps the level it has).
        comfortable = [
            lv
            for lv in known
            if rank(target) <= rank(lv) < rank(current) and count(lv, cfg.raise_margin) == 0
        ]
        if not comfortable:
            self._streak[phase] = 0
            return current
        self._streak[phase] += 1
        if self._streak[phase] < cfg.raise_after:
            return current
        self._streak[phase] = 0
        return min(comfortable, key=rank)
