"""The SLO controller on synthetic latency traces (injected clock, no sleeping)."""

from __future__ import annotations

import pytest

from brownout_jax.engine.controller import ControllerConfig, SloController
from brownout_jax.engine.phase import Phase, Thresholds
from brownout_jax.moe.ladder import DEFAULT_LADDER


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _controller(**fields):
    clock = FakeClock()
    cfg = ControllerConfig(
        mode="reactive", slo_ttft_s=1.0, slo_tpot_s=0.1, window_s=2.0, check_interval_s=5.0
    )
    cfg = ControllerConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, **fields})
    return SloController(cfg, DEFAULT_LADDER, clock), clock


def _feed(controller, clock, phase, latency, seconds=2.0, per_second=8):  # exact binary steps
    for _ in range(int(seconds * per_second)):
        clock.now += 1.0 / per_second
        controller.record(phase, latency)


def test_decrease_hold_increase_per_phase():
    ctl, clock = _controller()
    assert ctl.thresholds == Thresholds(1.0, 1.0)
    # Decode above its SLO, prefill comfortably under: decode shrinks, prefill stays at 1.
    clock.now = 5.0
    _feed(ctl, clock, Phase.DECODE, 0.15)
    _feed(ctl, clock, Phase.PREFILL, 0.1)
    assert ctl.maybe_update()
    assert ctl.thresholds == Thresholds(1.0, 0.8)
    # Still above: × 0.8 again → 0.64 snaps down to 0.6.
    clock.now += 5.0
    _feed(ctl, clock, Phase.DECODE, 0.15)
    ctl.maybe_update()
    assert ctl.threshold(Phase.DECODE) == 0.6
    # Between warning (0.08) and SLO (0.1): hold.
    clock.now += 5.0
    _feed(ctl, clock, Phase.DECODE, 0.09)
    assert not ctl.maybe_update()
    assert ctl.threshold(Phase.DECODE) == 0.6
    # Under the warning level: + 0.1 per check, capped at 1.
    for expected in (0.7, 0.8, 0.9, 1.0, 1.0):
        clock.now += 5.0
        _feed(ctl, clock, Phase.DECODE, 0.05)
        ctl.maybe_update()
        assert ctl.threshold(Phase.DECODE) == expected
    assert ctl.threshold(Phase.PREFILL) == 1.0


def test_stays_within_zero_and_one_and_only_checks_each_interval():
    ctl, clock = _controller()
    clock.now = 5.0
    for _ in range(20):
        clock.now += 3.0
        _feed(ctl, clock, Phase.PREFILL, 5.0)  # 2 s of slow steps, ending at the check
        ctl.maybe_update()
        assert 0.0 <= ctl.threshold(Phase.PREFILL) <= 1.0
    assert ctl.threshold(Phase.PREFILL) == 0.0
    last_check = clock.now
    _feed(ctl, clock, Phase.PREFILL, 0.01, seconds=2.5)  # fast now, but no check is due yet
    assert not ctl.maybe_update()
    assert ctl.threshold(Phase.PREFILL) == 0.0
    clock.now = last_check + 3.0
    _feed(ctl, clock, Phase.PREFILL, 0.01)  # reaches the next check with a fast window
    assert ctl.maybe_update()
    assert ctl.threshold(Phase.PREFILL) == 0.1  # climbs back from 0


def test_p90_uses_only_the_sliding_window():
    ctl, clock = _controller()
    _feed(ctl, clock, Phase.DECODE, 10.0, seconds=1.0)  # old and slow
    clock.now += 3.0  # leaves the 2 s window
    _feed(ctl, clock, Phase.DECODE, 0.01, seconds=1.0)
    assert ctl.p90(Phase.DECODE) == pytest.approx(0.01)
    assert ctl.attainment(Phase.DECODE) == 1.0
    assert ctl.p90(Phase.PREFILL) is None


def test_no_samples_hold_and_modes():
    ctl, clock = _controller()
    clock.now = 10.0
    assert not ctl.maybe_update()
    off, _ = _controller(mode="off")
    fixed = SloController(ControllerConfig.parse_mode("fixed=0.45"), DEFAULT_LADDER)
    assert fixed.thresholds == Thresholds(0.4, 0.4)
    assert off.thresholds == Thresholds(1.0, 1.0)
    with pytest.raises(ValueError, match="auto, reactive, off or fixed"):
        ControllerConfig.parse_mode("sometimes")


def test_coarse_ladder_recovers():
    from brownout_jax.moe.ladder import ThresholdLadder

    clock = FakeClock()
    ctl = SloController(
        ControllerConfig(mode="reactive", slo_tpot_s=0.1, window_s=2.0, check_interval_s=5.0),
        ThresholdLadder((0.0, 0.5, 1.0)),
        clock,
    )
    trace = [(0.2, 0.5), (0.2, 0.0), (0.01, 0.5), (0.01, 1.0)]  # ×0.8 snaps down, +0.1 up
    for latency, expected in trace:
        clock.now += 3.0
        _feed(ctl, clock, Phase.DECODE, latency)
        ctl.maybe_update()
        assert ctl.threshold(Phase.DECODE) == expected


def test_slo_margin_flag_reaches_the_predictive_policy():
    import argparse

    from brownout_jax.cli.options import add_brownout_mode_arguments, controller_from_args

    parser = argparse.ArgumentParser()
    add_brownout_mode_arguments(parser)
    config = controller_from_args(parser.parse_args(["--slo-margin", "0.7"]))
    assert config.mode == "auto"
    assert (config.predictive.margin, config.predictive.raise_margin) == (0.7, 0.7)
    default = controller_from_args(parser.parse_args([]))
    assert (default.predictive.margin, default.predictive.raise_margin) == (0.9, 0.75)
    with pytest.raises(ValueError, match="margin"):
        controller_from_args(parser.parse_args(["--slo-margin", "1.5"]))
