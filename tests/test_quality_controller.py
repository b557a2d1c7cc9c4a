"""Quality as a cost in mode ``auto``, on synthetic latency and quality tables (no JAX): a phase
whose levels time alike is never browned out, a burst is answered by the level giving up least
that fits, equal quality costs reduce to the rule without them; and the quality side of
``eval slo`` (token-weighted thresholds, expected KL per token, violation causes) against
hand-computed examples."""

from __future__ import annotations

import itertools
import json
import types

import pytest

from brownout_jax.engine.buckets import Bucket
from brownout_jax.engine.latency_model import LatencyModel
from brownout_jax.engine.metrics import StepRecord
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.engine.predictive import PredictivePolicy, StepView
from brownout_jax.engine.quality_costs import MANIFEST_KEY, QualityCosts
from brownout_jax.engine.requests import RequestMetrics
from brownout_jax.engine.step_view import last_token_time, lead_s
from brownout_jax.eval.slo import expected_kl_per_token, token_weighted_thresholds
from brownout_jax.eval.slo_trace import cause_of, violation_causes

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
DECODE = Bucket(16, 8)
PREFILL = Bucket(4, 64)
SLO = {Phase.DECODE: 0.2, Phase.PREFILL: 1.0}
DECODE_MS = {1.0: 100.0, 0.75: 85.0, 0.5: 80.0, 0.25: 65.0, 0.0: 50.0}
PREFILL_MS = {1.0: 400.0, 0.75: 360.0, 0.5: 320.0, 0.25: 280.0, 0.0: 250.0}


def _model(decode_ms=DECODE_MS, prefill_ms=PREFILL_MS) -> LatencyModel:
    model = LatencyModel()
    for level in LEVELS:
        model.set_base(Phase.DECODE, level, DECODE, [decode_ms[level] / 1e3])
        model.set_base(Phase.PREFILL, level, PREFILL, [prefill_ms[level] / 1e3])
    return model


def _decode(lead_s: float = 0.0) -> StepView:
    return StepView(Phase.DECODE, DECODE, lead_s)


def _prefill(ages=(), lead_s: float = 0.0) -> StepView:
    return StepView(Phase.PREFILL, PREFILL, lead_s, tuple(ages), 4, None)


def _costs(decode: dict[float, float]) -> QualityCosts:
    return QualityCosts(tuple(decode.items()), tuple(decode.items()))


def test_a_phase_whose_levels_time_alike_is_never_browned_out():
    """Prefill levels within 3 % of each other: whatever the backlog (requests late at every
    level, a step in flight, many waiting; a request 0.505 s old misses at 1, 400 ms, and fits
    at 0.5, 394 ms), prefill stays exact; decode, whose levels differ, still browns out."""
    alike = {lv: 400.0 - 12.0 * (1 - lv) for lv in LEVELS}  # 388 … 400 ms
    policy = PredictivePolicy(_model(prefill_ms=alike), SLO)
    assert policy.worth_running(Phase.PREFILL, {lv: alike[lv] for lv in LEVELS}) == [1.0]
    for ages, in_flight in itertools.product(
        ((), (0.505,), (1.5, 0.9, 0.2), (0.3,) * 12), (0, 0.3)
    ):
        assert policy.choose(_prefill(ages, in_flight), Thresholds(), LEVELS) == 1.0
    assert policy.choose(_decode(lead_s=0.12), Thresholds(), LEVELS) < 1.0


def test_a_burst_is_answered_by_the_level_giving_up_least_that_fits():
    """0.9 · 200 ms with 100 ms in flight leaves 80 ms: 0.5 (80) and lower fit, 0.75 (85)
    does not. By ladder position 0.5 wins; with measured KL where 0.25 costs less than 0.5
    (a level the united experts serve well), 0.25 wins — and 0.75, though cheaper still,
    is not chosen because it does not fit."""
    view = _decode(lead_s=0.1)
    by_position = PredictivePolicy(_model(), SLO)
    assert by_position.choose(view, Thresholds(), LEVELS) == 0.5
    kl = {0.0: 0.4, 0.25: 0.05, 0.5: 0.09, 0.75: 0.01}
    measured = PredictivePolicy(_model(), SLO, quality=_costs(kl))
    assert measured.choose(view, Thresholds(), LEVELS) == 0.25
    # Quiet: the exact level fits and costs nothing.
    assert measured.choose(_decode(), Thresholds(), LEVELS) == 1.0


def test_a_lower_level_no_faster_than_a_cheaper_one_is_never_run():
    """0.75 times like 1 (98 vs 100 ms): not worth running; 0.5 is (80 ms)."""
    decode = {**DECODE_MS, 0.75: 98.0}
    policy = PredictivePolicy(_model(decode_ms=decode), SLO)
    assert policy.worth_running(Phase.DECODE, {lv: decode[lv] for lv in LEVELS}) == [
        1.0,
        0.5,
        0.25,
        0.0,
    ]
    # 0.9 · 200 − 95 in flight = 85 ms: 0.75 (98) would not fit anyway; 0.5 (80) does.
    assert policy.choose(_decode(lead_s=0.095), Thresholds(), LEVELS) == 0.5


@pytest.mark.parametrize("cost", [0.0, 0.2])
def test_equal_quality_costs_reduce_to_the_rule_without_them(cost):
    """Every browned-out level costing the same: the same choice as by ladder position (the
    rule before quality costs, which tests/test_predictive_controller.py pins down) on every
    view of a grid of loads and every current level — the highest level that fits, else the
    fewest misses and the fastest of those."""
    equal = QualityCosts(*[tuple((lv, cost) for lv in LEVELS[:-1])] * 2)
    views = [_decode(f) for f in (0.0, 0.05, 0.09, 0.1, 0.12, 0.14, 0.3)]
    views += [_prefill(a, f) for a in ((), (0.4,), (0.6, 0.1), (1.2,)) for f in (0, 0.1)]
    plain = PredictivePolicy(_model(), SLO)
    same = PredictivePolicy(_model(), SLO, quality=equal)
    for view, current in itertools.product(views, LEVELS):
        thresholds = Thresholds(current, current)
        for _ in range(4):  # through the raising hysteresis too
            expected = plain.choose(view, thresholds, LEVELS)
            assert same.choose(view, thresholds, LEVELS) == expected, (view, current)


def test_quality_costs_from_rows_interpolate_and_survive_the_manifest():
    rows = [
        {"phase": "decode", "threshold": 0.0, "kl_mean": 0.4, "exempt_layers": []},
        {"phase": "decode", "threshold": 0.5, "kl_mean": 0.1, "exempt_layers": []},
        {"phase": "both", "threshold": 0.0, "kl_mean": 0.8, "exempt_layers": []},
        {"phase": "both", "threshold": 1.0, "kl_mean": 0.0, "exempt_layers": []},
    ]
    costs = QualityCosts.from_quality_rows(rows, "text")
    assert costs.decode == ((0.0, 0.4), (0.5, 0.1), (1.0, 0.0))
    assert costs.prefill == ((0.0, 0.8), (1.0, 0.0))  # no prefill rows: full brownout's
    assert costs.kl(Phase.DECODE, 0.25) == pytest.approx(0.25)
    assert costs.kl(Phase.DECODE, 0.75) == pytest.approx(0.05)
    assert costs.kl(Phase.PREFILL, 1.0) == 0.0
    manifest = json.loads(json.dumps({MANIFEST_KEY: costs.to_manifest()}))
    assert QualityCosts.from_manifest(manifest) == costs
    # Storing a decode-only measurement keeps the stored prefill curve.
    decode_only = QualityCosts.from_quality_rows(rows[:2], "later")
    assert decode_only.decode == costs.decode and not decode_only.measured(Phase.PREFILL)
    stored = QualityCosts(((0.0, 0.01),), ((0.0, 9.0),))
    assert decode_only.merged_into(stored) == QualityCosts(stored.prefill, costs.decode, "later")
    default = QualityCosts.from_manifest({})
    assert default.kl(Phase.DECODE, 0.5) is None and default.cost(Phase.DECODE, 0.25) == 0.75
    with pytest.raises(ValueError, match="KL"):
        QualityCosts(((0.5, float("nan")),))


def _step(t, phase, level, rows, latency=0.01, **trace):
    prefill, decode = (level, 1.0) if phase == "prefill" else (1.0, level)
    return StepRecord(t, Phase(phase), latency, rows, prefill, decode, **trace)


def test_token_weighted_thresholds_and_expected_kl_by_hand():
    steps = [
        _step(0.0, "prefill", 1.0, 4),
        _step(0.1, "prefill", 0.5, 1),
        _step(0.2, "decode", 0.0, 2),
        _step(0.3, "decode", 1.0, 6),
        _step(0.4, "decode", 0.5, 12),
    ]
    th = token_weighted_thresholds(steps)
    # prefill: (4 · 1 + 1 · 0.5) / 5 = 0.9; its lowest-level token is 20 % of 5 → P10 0.5.
    assert th["prefill"] == {"mean": pytest.approx(0.9), "p10": 0.5}
    # decode: (2 · 0 + 6 · 1 + 12 · 0.5) / 20 = 0.6; 2 of 20 tokens (10 %) at 0 → P10 0.
    assert th["decode"] == {"mean": pytest.approx(0.6), "p10": 0.0}
    costs = QualityCosts(((0.5, 0.3), (0.0, 0.5)), ((0.0, 0.4), (0.5, 0.1)))
    # Prefill: one request of five browned out at 0.5 (0.3 on each of its tokens): 0.06 per
    # token; decode: (2 · 0.4 [at 0] + 12 · 0.1 [at 0.5]) over all 25 tokens: 0.08.
    assert expected_kl_per_token(steps, costs) == pytest.approx(0.3 / 5 + 2.0 / 25)
    assert expected_kl_per_token(steps, QualityCosts()) is None  # browned out, no KL stored
    assert expected_kl_per_token([s for s in steps if s.rows in (4, 6)], QualityCosts()) == 0.0
    assert token_weighted_thresholds([])["decode"] == {"mean": None, "p10": None}


def test_each_over_slo_step_gets_one_cause():
    slo = 0.1
    fits = _step(
        0.1, "decode", 1.0, 1, 0.05, execution_s=0.05, predicted_s=0.05, predicted_p90_s=0.06
    )
    knowingly = _step(
        0.2, "decode", 0.0, 1, 0.15, execution_s=0.15, predicted_s=0.14, predicted_p90_s=0.16
    )
    queued = _step(
        0.3, "decode", 1.0, 1, 0.15, execution_s=0.06, predicted_s=0.07, predicted_p90_s=0.08
    )
    under = _step(
        0.4, "decode", 1.0, 1, 0.15, execution_s=0.15, predicted_s=0.07, predicted_p90_s=0.08
    )
    blind = _step(0.5, "decode", 1.0, 1, 0.15)
    assert [cause_of(s, slo) for s in (fits, knowingly, queued, under, blind)] == [
        None,
        "predicted",
        "queued",
        "underpredicted",
        "unpredicted",
    ]
    report = violation_causes([fits, knowingly, queued, under, blind], "decode", slo, 0.0, 2.0)
    assert report["violated_windows"] == 1
    assert report["over_slo_steps_by_cause"] == {
        "predicted": 1,
        "queued": 1,
        "underpredicted": 1,
        "unpredicted": 1,
    }
    assert report["share_above_predicted_p90"] == pytest.approx(2 / 4)


def test_prefill_is_paced_to_leave_the_decode_step_after_it_its_slo():
    """TPOT SLO 200 ms (0.9 of it: 180 ms); the decode step after the prefill holds the
    sequences decoding now plus those the prefill adds: 60 ms with two more rows, 70 with
    four. Four prompts at once (250 ms) may not go; two (110 ms) may; one always may (the
    queue's head must get in); a bucket not timed yet may (nothing is known against it)."""
    model = _model()
    one, two, four, untimed = Bucket(1, 64), Bucket(2, 64), Bucket(4, 64), Bucket(8, 64)
    for level in LEVELS:
        model.set_base(Phase.PREFILL, level, one, [0.08])
        model.set_base(Phase.PREFILL, level, two, [0.11 + 0.05 * level])
        model.set_base(Phase.PREFILL, level, four, [0.25])
        model.set_base(Phase.DECODE, level, Bucket(4, 8), [0.06 + 0.02 * level])
        model.set_base(Phase.DECODE, level, Bucket(8, 8), [0.07 + 0.02 * level])
    asked = []

    def after(rows: int) -> Bucket:  # two sequences decode now
        asked.append(rows)
        return Bucket(4, 8) if 2 + rows <= 4 else Bucket(8, 8)

    policy = PredictivePolicy(model, SLO)
    paced = policy.paced_prefill([one, two, four, untimed], LEVELS, after, LEVELS)
    assert paced == [one, two, untimed] and sorted(asked) == [2, 4]
    # Where the phase's levels time alike the exact level is the only one worth running:
    # two rows at 1 (160 ms) no longer fit with the 60-ms decode step after them.
    for level in LEVELS:
        model.set_base(Phase.PREFILL, level, two, [0.16])
    assert policy.paced_prefill([one, two, four], LEVELS, after, LEVELS) == [one]
    # A loose TPOT SLO leaves every bucket.
    loose = PredictivePolicy(model, {Phase.DECODE: 1.0, Phase.PREFILL: 1.0})
    assert loose.paced_prefill([one, two, four], LEVELS, after, LEVELS) == [one, two, four]


def _seq(*token_times):
    return types.SimpleNamespace(
        handle=types.SimpleNamespace(
            metrics=RequestMetrics(arrival=0.0, prompt_tokens=1, token_times=list(token_times))
        )
    )


def test_the_lead_of_a_step_is_what_its_rows_wait_before_it_runs():
    """Prefill: the rest of the step in flight. Decode: per sequence, nothing when its
    previous token comes with the step in flight; else the wait since that token plus the
    rest — the longest."""
    old, older, new = _seq(0.5, 1.0), _seq(0.9), _seq()
    decode = types.SimpleNamespace(phase=Phase.DECODE, sequences=[old, older])
    prefill = types.SimpleNamespace(phase=Phase.PREFILL, sequences=[new])
    assert lead_s(prefill, decode, 0.05, 1.2) == 0.05
    assert lead_s(decode, decode, 0.05, 1.2) == 0.0  # behind a decode step of the same rows
    # Behind another request's prefill: since the oldest last token (0.9), plus its rest.
    assert lead_s(decode, prefill, 0.05, 1.2) == pytest.approx(0.35)
    # A sequence whose first token the prefill in flight brings waits for nothing more.
    started = types.SimpleNamespace(phase=Phase.DECODE, sequences=[new])
    assert lead_s(started, prefill, 0.05, 1.2) == 0.0
    both = types.SimpleNamespace(phase=Phase.DECODE, sequences=[new, old])
    assert lead_s(both, prefill, 0.05, 1.2) == pytest.approx(0.25)
    assert last_token_time(both, default=7.0) == 1.0
    assert last_token_time(started, default=7.0) == 7.0


def test_a_prefill_nobody_waits_through_is_not_browned_out_for_the_decode_after_it():
    """A 400-ms prefill makes the decode step after it miss the 200-ms TPOT SLO at every
    level — when sequences decode. When only the sequences it starts will decode, their
    first gap starts from its tokens: nothing to brown out for."""
    stalling = StepView(Phase.PREFILL, PREFILL, 0.0, (), 4, DECODE, stalls_next=True)
    alone = StepView(Phase.PREFILL, PREFILL, 0.0, (), 4, DECODE, stalls_next=False)
    policy = PredictivePolicy(_model(), SLO)
    assert policy.choose(stalling, Thresholds(), LEVELS) == 0.0
    assert policy.choose(alone, Thresholds(), LEVELS) == 1.0


def test_an_engine_from_a_checkpoint_weighs_the_costs_stored_with_its_united_experts():
    from brownout_jax.checkpoints.demo_model import demo_united_dir
    from brownout_jax.checkpoints.united_store import read_united_manifest
    from brownout_jax.engine.config import EngineConfig
    from brownout_jax.engine.controller import ControllerConfig
    from brownout_jax.engine.front import with_stored_quality

    manifest = read_united_manifest(demo_united_dir("contiguous"))
    config = with_stored_quality(EngineConfig(), manifest)
    assert config.controller.quality == QualityCosts.from_manifest(manifest)
    assert config.controller.quality.measured(Phase.DECODE)  # the bundled set has its KL
    own = QualityCosts(((0.0, 1.0),), ((0.0, 1.0),))
    given = EngineConfig(controller=ControllerConfig(quality=own))
    assert with_stored_quality(given, manifest).controller.quality == own
    assert with_stored_quality(EngineConfig(), None) == EngineConfig()


def test_prefill_pacing_is_on_unless_turned_off_on_the_command_line():
    from brownout_jax.cli import main as cli
    from brownout_jax.cli.options import predictive_from_args

    parser = cli.build_parser()
    for command in (["serve"], ["eval", "slo"]):
        assert predictive_from_args(parser.parse_args(command)).pace_prefill
        off = parser.parse_args([*command, "--no-prefill-pacing"])
        assert not predictive_from_args(off).pace_prefill
