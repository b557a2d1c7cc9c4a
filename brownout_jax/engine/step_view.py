"""What mode ``auto`` knows about the step about to run (host state only, no JAX): the lead of
its latency before its own execution, the ``StepView`` the policy decides on, and the prefill
buckets pacing leaves to the scheduler. The engine loop calls these at each dispatch.

A step's latency is what its rows wait (``EngineLoop._process``): a prefill step's, dispatch →
tokens read; a decode step's, the gap each of its sequences sees since its previous token (the
longest). The lead is the predicted part of that before the step's own execution.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.predictive import PredictivePolicy, StepView
from brownout_jax.engine.scheduler import Scheduler, StepPlan

# (phase, level) → the buckets compiled and warmed up for it
UsableBuckets = Callable[[Phase, float], Collection[Bucket]]


def last_token_time(plan: StepPlan, default: float) -> float:
    """The oldest of the plan's sequences' last token times (``default``: none has one)."""
    times = [s.handle.metrics.token_times for s in plan.sequences]
    return min((t[-1] for t in times if t), default=default)


def lead_s(plan: StepPlan, in_flight: StepPlan | None, rest_s: float, now: float) -> float:
    """Predicted seconds of the step's latency before its own execution, ``rest_s`` being
    what the step in flight still runs. Prefill: that rest (its requests wait through it).
    Decode, per sequence: nothing for one whose previous token comes with the step in flight
    (its gap starts there); for the others, the wait since their last token plus that rest —
    the longest."""
    if plan.phase == Phase.PREFILL:
        return rest_s
    fed = set() if in_flight is None else {id(s) for s in in_flight.sequences}
    lead = 0.0
    for seq in plan.sequences:
        times = seq.handle.metrics.token_times
        if id(seq) not in fed and times:
            lead = max(lead, rest_s + now - times[-1])
    return lead


def predicted_latency(
    latency: LatencyModel, plan: StepPlan, level: float, lead: float
) -> tuple[float, float] | None:
    """(mean, P90) of the step's latency as the model predicts it at dispatch: its lead, then
    its own execution (the per-step trace of ``eval slo``); None: nothing known."""
    mean = latency.predict(plan.phase, level, plan.bucket)
    if mean is None:
        return None
    return lead + mean, lead + latency.predict_p90(plan.phase, level, plan.bucket)


def step_view(
    plan: StepPlan,
    levels: Thresholds,
    lead: float,
    now: float,
    scheduler: Scheduler,
    usable: UsableBuckets,
    ladder: Sequence[float],
) -> tuple[StepView, list[float], list[float]]:
    """(the view, the levels the plan's bucket runs at, the levels the other phase runs at)."""
    phase = plan.phase
    runnable = [lv for lv in ladder if plan.bucket in usable(phase, lv)]
    other = phase.other
    other_levels = [lv for lv in ladder if usable(other, lv)]
    next_bucket = scheduler.next_bucket(other, usable(other, levels.of(other)))
    ages: tuple[float, ...] = ()
    stalls_next = True
    if phase == Phase.PREFILL:  # who waits for a first token (not recomputations)
        queued = list(plan.sequences) + list(scheduler.waiting)
        ages = tuple(
            now - s.handle.metrics.arrival
            for s in queued
            if not s.generated and s.handle.metrics.arrival is not None
        )
        # The decode step after it stalls only the sequences decoding before it: those it
        # starts see their first gap from its tokens on.
        stalls_next = scheduler.decoding_besides(plan)
    view = StepView(phase, plan.bucket, lead, ages, len(plan.rows), next_bucket, stalls_next)
    return view, runnable, other_levels


def paced_prefill_buckets(
    buckets: Collection[Bucket],
    levels: Thresholds,
    scheduler: Scheduler,
    usable: UsableBuckets,
    ladder: Sequence[float],
    policy: PredictivePolicy,
) -> Collection[Bucket]:
    """The prefill buckets the scheduler may use now (pacing, ``PredictivePolicy``)."""
    decoding = usable(Phase.DECODE, levels.decode)
    if scheduler.next_bucket(Phase.DECODE, decoding) is None:
        return buckets  # nothing decodes: nobody waits through a prefill step

    def decode_bucket(prefill_rows: int) -> Bucket | None:
        return scheduler.next_bucket(Phase.DECODE, decoding, extra_rows=prefill_rows)

    prefill_levels = [lv for lv in ladder if usable(Phase.PREFILL, lv)]
    decode_levels = [lv for lv in ladder if usable(Phase.DECODE, lv)]
    return policy.paced_prefill(buckets, prefill_levels, decode_bucket, decode_levels)
