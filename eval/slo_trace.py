"""The per-step trace of an ``eval slo`` run, and why its violated windows violated.

Each step's record holds what the latency model predicted at its dispatch (mean and P90 of its
latency: its lead, ``step_view.lead_s``, + its own execution) beside what was measured. A step
over its phase's SLO is put down to one cause, checked in this order:

- ``queued``: its own execution (timed: see ``EngineLoop._process``) was within the SLO, the
  wait for the step before it was not (a decode step behind a prefill step: what prefill
  pacing cuts; no level of the step itself could);
- ``predicted``: its predicted P90 was over the SLO already — no level fitted (the controller
  chose knowingly; in modes other than ``auto``, the level in force was predicted to miss);
- ``underpredicted``: predicted within the SLO, measured over it (prediction error: a new
  batch shape, a noisy neighbour, the host);
- ``unpredicted``: no prediction (a step not timed before serving).

Host-only (numpy); the CSV has one row per step.
"""

from __future__ import annotations

import collections
import csv
import enum
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from brownout_jax.engine.metrics import StepRecord
from brownout_jax.engine.phase import Phase


class Cause(enum.StrEnum):
    QUEUED = "queued"
    PREDICTED = "predicted"
    UNDERPREDICTED = "underpredicted"
    UNPREDICTED = "unpredicted"


FIELDS = (
    "time_s",
    "phase",
    "rows",
    "bucket",
    "level",
    "latency_s",
    "execution_s",
    "predicted_s",
    "predicted_p90_s",
    "decision_s",
    "cause",
)


def level_of(step: StepRecord) -> float:
    return step.prefill_threshold if step.phase == Phase.PREFILL else step.decode_threshold


def cause_of(step: StepRecord, slo: float) -> Cause | None:
    """Why the step's latency exceeded ``slo`` (None: it did not)."""
    if step.latency_s <= slo:
        return None
    if step.execution_s is not None and step.execution_s <= slo:
        return Cause.QUEUED
    if step.predicted_p90_s is None:
        return Cause.UNPREDICTED
    if step.predicted_p90_s > slo:
        return Cause.PREDICTED
    return Cause.UNDERPREDICTED


def windows(
    steps: list[StepRecord], phase: str, start: float, end: float
) -> Iterator[tuple[float, list[StepRecord], float]]:
    """The 1-s windows from ``start`` to ``end`` holding steps of ``phase``: (window start,
    its steps, their P90 latency) — BrownoutServe's violation periods are those over the SLO."""
    own = [s for s in steps if s.phase == phase]
    for t0 in np.arange(start, end, 1.0):
        window = [s for s in own if t0 <= s.time < t0 + 1.0]
        if window:
            yield float(t0), window, float(np.percentile([s.latency_s for s in window], 90))


def violation_causes(
    steps: list[StepRecord], phase: str, slo: float, start: float, end: float
) -> dict:
    """Over the 1-s windows whose P90 exceeds ``slo``: how many of their over-SLO steps had
    each cause, and the windows' count. Also, over all the phase's steps with a prediction,
    the median measured / predicted latency and the share above the predicted P90."""
    causes: collections.Counter[Cause] = collections.Counter()
    violated = 0
    for _, window, p90 in windows(steps, phase, start, end):
        if p90 > slo:
            violated += 1
            causes.update(c for s in window if (c := cause_of(s, slo)) is not None)
    predicted = [s for s in steps if s.phase == phase and s.predicted_s]
    ratio = [s.latency_s / s.predicted_s for s in predicted]
    above = [s.latency_s > s.predicted_p90_s for s in predicted]
    return {
        "violated_windows": violated,
        "over_slo_steps_by_cause": {c.value: causes[c] for c in Cause},
        "median_measured_over_predicted": float(np.median(ratio)) if ratio else None,
        "share_above_predicted_p90": float(np.mean(above)) if above else None,
    }


def write_trace(steps: list[StepRecord], start: float, slo: dict[Phase, float], path: Path) -> Path:
    """One row per step; ``cause`` is set for a step over its phase's SLO."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        for s in steps:
            cause = cause_of(s, slo[Phase(s.phase)])
            writer.writerow(
                (
                    round(s.time - start, 6),
                    s.phase,
                    s.rows,
                    "" if s.bucket is None else f"{s.bucket[0]}x{s.bucket[1]}",
                    level_of(s),
                    round(s.latency_s, 6),
                    "" if s.execution_s is None else round(s.execution_s, 6),
                    "" if s.predicted_s is None else round(s.predicted_s, 6),
                    "" if s.predicted_p90_s is None else round(s.predicted_p90_s, 6),
                    round(s.decision_s, 7),
                    "" if cause is None else cause.value,
                )
            )
    return path
