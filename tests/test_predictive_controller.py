"""The predictive brownout policy (mode ``auto``) and its latency model on a synthetic latency
table: a burst is answered within one step by the highest fitting level, recovery returns to
1, no flapping at the boundary, a 2× slower machine is learned within a few steps. No JAX."""

from __future__ import annotations

import pytest

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.controller import BrownoutMode, ControllerConfig, SloController
from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.predictive import PredictiveConfig, PredictivePolicy, StepView
from brownout_jax.moe.ladder import ThresholdLadder

LEVELS = (0.0, 0.5, 1.0)
DECODE = Bucket(16, 8)
PREFILL = Bucket(4, 64)
# Synthetic table (ms): decode 16 rows 100/70/50 at levels 1/0.5/0; prefill 400/300/250.
DECODE_MS = {1.0: 100.0, 0.5: 70.0, 0.0: 50.0}
PREFILL_MS = {1.0: 400.0, 0.5: 300.0, 0.0: 250.0}
SLO = {Phase.DECODE: 0.2, Phase.PREFILL: 1.0}


def _model(scale: float = 1.0) -> LatencyModel:
    model = LatencyModel(alpha=0.5)
    for level in LEVELS:
        model.set_base(Phase.DECODE, level, DECODE, [scale * DECODE_MS[level] / 1e3] * 3)
        model.set_base(Phase.PREFILL, level, PREFILL, [scale * PREFILL_MS[level] / 1e3])
    return model


def _policy(model: LatencyModel | None = None, **config) -> PredictivePolicy:
    return PredictivePolicy(model or _model(), SLO, PredictiveConfig(**config))


def _decode(lead_s: float = 0.0, next_prefill: bool = False) -> StepView:
    return StepView(Phase.DECODE, DECODE, lead_s, next_bucket=PREFILL if next_prefill else None)


def _prefill(ages=(), lead_s: float = 0.0, decoding: bool = True) -> StepView:
    return StepView(Phase.PREFILL, PREFILL, lead_s, tuple(ages), 4, DECODE if decoding else None)


def _run(policy: PredictivePolicy, view: StepView, thresholds: Thresholds) -> Thresholds:
    level = policy.choose(view, thresholds, LEVELS)
    return thresholds.with_level(view.phase, level)


def test_a_burst_is_answered_within_one_step_by_the_highest_fitting_level():
    policy = _policy()
    levels = Thresholds()
    # Quiet: decode at level 1 (100 ms) fits 0.9 · 200 ms.
    assert policy.choose(_decode(), levels, LEVELS) == 1.0
    # A prefill step still in flight: 60 + 100 ms fits 180 too; 100 ms in flight: level 1
    # (200) misses, 0.5 (170) fits; 120 ms: 0.5 (190) misses too, 0 (170) fits.
    assert policy.choose(_decode(lead_s=0.06), levels, LEVELS) == 1.0
    assert policy.choose(_decode(lead_s=0.1), levels, LEVELS) == 0.5
    assert policy.choose(_decode(lead_s=0.12), levels, LEVELS) == 0.0
    # Nothing fits (a 300-ms prefill ahead): fewest misses, ties → the lowest level.
    assert policy.choose(_decode(lead_s=0.3), levels, LEVELS) == 0.0


def test_the_step_after_must_still_fit_its_own_slo():
    """A prefill at level 1 (400 ms) makes the next decode step (≥ 400 + 50 ms) miss the
    200-ms TPOT SLO whatever its level; so does every prefill level here: fewest misses, and
    among ties the lowest. With a looser TPOT SLO the prefill keeps level 1."""
    assert _policy().choose(_prefill(), Thresholds(), LEVELS) == 0.0
    loose = PredictivePolicy(_model(), {Phase.DECODE: 1.0, Phase.PREFILL: 1.0})
    assert loose.choose(_prefill(), Thresholds(), LEVELS) == 1.0
    # Decode before a waiting prefill: decode + the cheapest prefill must fit the TTFT SLO.
    # (0.9 · 360 ms = 324: 100 + 250 misses, 70 + 250 fits.)
    tight = PredictivePolicy(_model(), {Phase.DECODE: 1.0, Phase.PREFILL: 0.36})
    assert tight.choose(_decode(next_prefill=True), Thresholds(), LEVELS) == 0.5


def test_prefill_brings_the_oldest_waiting_request_under_its_ttft_slo():
    policy = PredictivePolicy(_model(), {Phase.DECODE: 1.0, Phase.PREFILL: 1.0})
    # Waited 0.4 s: 0.4 + 0.4 fits 0.9 at level 1.
    assert policy.choose(_prefill(ages=(0.4,)), Thresholds(), LEVELS) == 1.0
    # Waited 0.55 s: 0.55 + 0.4 misses at 1; 0.55 + 0.3 fits at 0.5.
    assert policy.choose(_prefill(ages=(0.55,)), Thresholds(), LEVELS) == 0.5
    # Five waiting, four per step: the fifth is served by the second round (two prefills and
    # the decode between them at its level 1): 0.05 + 0.8 + 0.1 misses at 1, 0.05 + 0.6 +
    # 0.1 fits at 0.5, as do the first four.
    ages = (0.35, 0.3, 0.3, 0.3, 0.05)
    assert policy.misses(_prefill(ages=ages), 1.0, Thresholds(), LEVELS, 0.9) == 1
    assert policy.choose(_prefill(ages=ages), Thresholds(), LEVELS) == 0.5
    # No level can bring the oldest under the SLO (already waited 1.2 s): level 0 drains
    # fastest; leaving late requests out of the count, the next one fits at level 1.
    assert policy.choose(_prefill(ages=(1.2, 0.1)), Thresholds(), LEVELS) == 0.0
    lenient = PredictivePolicy(
        _model(),
        {Phase.DECODE: 1.0, Phase.PREFILL: 1.0},
        PredictiveConfig(count_late_requests=False),
    )
    assert lenient.choose(_prefill(ages=(1.2, 0.1)), Thresholds(), LEVELS) == 1.0


def test_recovery_returns_to_one_after_raise_after_comfortable_steps():
    policy = _policy(raise_after=3)
    levels = _run(policy, _decode(lead_s=0.12), Thresholds())
    assert levels.decode == 0.0
    seen = []
    for _ in range(4):
        levels = _run(policy, _decode(), levels)
        seen.append(levels.decode)
    # 100 ms at level 1 is within 0.75 · 200 ms: raised on the third quiet decision.
    assert seen == [0.0, 0.0, 1.0, 1.0]


def test_no_flapping_under_a_steady_load_at_the_boundary():
    """Level 1 predicted just above and just below the margin, step after step: it drops to
    0.5 at the first miss and stays (1 never fits with the tighter raise margin)."""
    policy = _policy()
    levels = Thresholds()
    changes = 0
    for i in range(40):
        in_flight = 0.085 if i % 2 else 0.075  # level 1: 185 (miss) / 175 ms (fits 180)
        before = levels.decode
        levels = _run(policy, _decode(lead_s=in_flight), levels)
        changes += levels.decode != before
    assert levels.decode == 0.5 and changes == 1


def test_online_correction_learns_a_two_times_slower_machine_within_a_few_steps():
    model = _model()
    policy = _policy(model)
    assert policy.choose(_decode(), Thresholds(), LEVELS) == 1.0
    for step in range(6):  # every step runs twice as long as measured at warm-up
        level = LEVELS[step % 3]
        model.observe(Phase.DECODE, level, DECODE, 2 * DECODE_MS[level] / 1e3)
    for level in LEVELS:  # shared across levels: level 1 learned from all three
        predicted = model.predict(Phase.DECODE, level, DECODE)
        assert predicted == pytest.approx(2 * DECODE_MS[level] / 1e3, rel=0.05)
    # Now ~200 ms at 1, ~140 at 0.5: level 1 no longer fits 180 ms.
    assert policy.choose(_decode(), Thresholds(), LEVELS) == 0.5


def test_a_level_not_yet_measured_is_predicted_from_the_next_higher_one():
    model = LatencyModel()
    model.set_base(Phase.DECODE, 1.0, DECODE, [0.1])
    assert model.predict(Phase.DECODE, 0.5, DECODE) == pytest.approx(0.1)  # the safe side
    assert model.predict(Phase.DECODE, 0.5, Bucket(1, 1)) is None
    model.observe(Phase.DECODE, 0.5, DECODE, 0.06)  # its first execution becomes its base
    assert model.predict(Phase.DECODE, 0.5, DECODE) == pytest.approx(0.06)
    table = {(e.phase, e.level, e.bucket): e.predicted_s for e in model.table()}
    assert table == {
        (Phase.DECODE, 0.5, DECODE): pytest.approx(0.06),
        (Phase.DECODE, 1.0, DECODE): pytest.approx(0.1),
    }


def test_auto_is_the_default_mode_and_chooses_per_step():
    ladder = ThresholdLadder(LEVELS)
    controller = SloController(
        ControllerConfig(slo_tpot_s=0.2, slo_ttft_s=1.0), ladder, latency=_model()
    )
    assert controller.config.mode is BrownoutMode.AUTO and controller.predictive
    assert controller.choose(_decode(lead_s=0.1), LEVELS, LEVELS) == 0.5
    assert controller.thresholds == Thresholds(1.0, 0.5) and controller.updates == 1
    assert not controller.maybe_update(now=1e6)  # the periodic rule is reactive's only
    reactive = SloController(ControllerConfig.parse_mode("reactive"), ladder)
    assert reactive.config.mode is BrownoutMode.REACTIVE and not reactive.predictive
    with pytest.raises(RuntimeError, match="reactive"):
        reactive.choose(_decode(), LEVELS, LEVELS)


def test_config_rejects_margins_out_of_order():
    with pytest.raises(ValueError, match="raise_margin"):
        PredictiveConfig(margin=0.8, raise_margin=0.9)


def test_levels_that_time_alike_are_not_browned_out_for_nothing():
    """No level fits (a request already 1.2 s old); the levels differ by 2 %: the policy keeps
    level 1 (browning out would save no time). With min_gain 0, the fastest level drains."""
    model = LatencyModel()
    for level, ms in ((0.0, 392.0), (0.5, 396.0), (1.0, 400.0)):
        model.set_base(Phase.PREFILL, level, PREFILL, [ms / 1e3])
    slo = {Phase.DECODE: 1.0, Phase.PREFILL: 1.0}
    view = _prefill(ages=(1.2,), decoding=False)
    assert PredictivePolicy(model, slo).choose(view, Thresholds(), LEVELS) == 1.0
    eager = PredictivePolicy(model, slo, PredictiveConfig(min_gain=0.0))
    assert eager.choose(view, Thresholds(), LEVELS) == 0.0
    # Where a lower level is markedly faster (the synthetic table: 250 vs 400 ms), it drains.
    assert _policy().choose(_prefill(ages=(1.2,), decoding=False), Thresholds(), LEVELS) == 0.0


def test_the_p90_prediction_learns_the_spread_of_step_times():
    model = _model()
    mean = model.predict(Phase.DECODE, 1.0, DECODE)
    assert model.predict_p90(Phase.DECODE, 1.0, DECODE) == mean  # no spread measured yet
    for i in range(40):  # ±20 % around the base, alternately
        model.observe(Phase.DECODE, 1.0, DECODE, mean * (1.2 if i % 2 else 0.8))
    spread = model.spread(Phase.DECODE)
    assert 0.15 < spread < 0.3
    p90 = model.predict_p90(Phase.DECODE, 1.0, DECODE)
    assert p90 == pytest.approx(model.predict(Phase.DECODE, 1.0, DECODE) * (1 + 1.2816 * spread))
    assert model.predict_p90(Phase.PREFILL, 1.0, PREFILL) == model.predict(
        Phase.PREFILL, 1.0, PREFILL
    )  # per phase
    # The policy decides on the P90: 0.1 s mean fits 0.18 s, its P90 (~0.13 s) + 0.06 does not.
    policy = _policy(model)
    entry = next(e for e in model.table() if e.phase == Phase.DECODE and e.level == 1.0)
    assert entry.predicted_p90_s == pytest.approx(p90)
    assert policy.choose(_decode(lead_s=0.18 - 0.1), Thresholds(), LEVELS) < 1.0
