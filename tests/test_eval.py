"""Offline evaluation: task formats, scoring, traces, and an end-to-end `eval slo` run."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model_config

from brownout_jax.cli import main as cli
from brownout_jax.eval.scoring import continuation_logprobs
from brownout_jax.eval.tasks import TaskFormatError, load_task
from brownout_jax.eval.workload import WorkloadConfig, arrival_times, make_trace
from brownout_jax.model.params import init_random_params
from brownout_jax.model.transformer import forward_logits
from brownout_jax.moe.options import MoeOptions

FIXTURES = {
    "piqa": {"goal": "To open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0},
    "copa": {
        "premise": "The man fell.",
        "choice1": "He slipped.",
        "choice2": "He sang.",
        "question": "cause",
        "label": 0,
    },
    "obqa": {
        "question": {
            "stem": "The sun is a",
            "choices": [{"text": "star", "label": "A"}, {"text": "planet", "label": "B"}],
        },
        "answerKey": "A",
    },
    "ceval": {"question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"},
    "mc": {"goal": "Return the", "sol1": "a", "sol2": "b", "sol3": "c", "sol4": "d", "label": 3},
}


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_task_formats_parse_and_detect(tmp_path, fmt):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text(json.dumps(FIXTURES[fmt]) + "\n" + json.dumps(FIXTURES[fmt]) + "\n")
    items, used = load_task(path)
    assert used == fmt and len(items) == 2
    expected_label = {"piqa": 0, "copa": 0, "obqa": 0, "ceval": 1, "mc": 3}[fmt]
    assert items[0].label == expected_label
    assert len(items[0].choices) == {"piqa": 2, "copa": 2, "obqa": 2, "ceval": 4, "mc": 4}[fmt]


def test_malformed_lines_are_reported_with_their_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(FIXTURES["piqa"])
    path.write_text(good + "\n" + good + "\n{broken\n")
    with pytest.raises(TaskFormatError, match=r"bad\.jsonl:3"):
        load_task(path)
    path.write_text(good + "\n" + json.dumps({**FIXTURES["piqa"], "label": 5}) + "\n")
    with pytest.raises(TaskFormatError, match=r"bad\.jsonl:2.*label 5"):
        load_task(path)


def test_bundled_demo_task_loads():
    from pathlib import Path

    import brownout_jax.eval as ev

    path = Path(ev.__file__).parent / "tasks" / "docstring_mc.jsonl"
    items, fmt = load_task(path)
    assert fmt == "mc" and len(items) >= 200
    assert all(len(i.choices) == 4 for i in items)


def test_loglikelihood_scoring_equals_direct_computation():
    config = tiny_model_config()
    params = init_random_params(config, jax.random.key(1), scale=0.3)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, config.vocab_size, n).tolist() for n in (9, 14, 5)]
    starts = [4, 10, 2]
    sums, counts = continuation_logprobs(params, config, sequences, starts, MoeOptions(), 2)
    for seq, start, total, count in zip(sequences, starts, sums, counts, strict=True):
        logits = forward_logits(params, config, jnp.asarray([seq]), jnp.asarray([len(seq)]))
        logp = jax.nn.log_softmax(logits[0], -1)
        direct = sum(float(logp[t - 1, seq[t]]) for t in range(start, len(seq)))
        assert count == len(seq) - start
        assert total == pytest.approx(direct, rel=1e-5)


def test_trace_is_reproducible_with_the_requested_rate_and_burstiness():
    cfg = WorkloadConfig(request_rate=20.0, duration_s=500.0, burstiness=0.5, seed=3)
    a = arrival_times(cfg, np.random.default_rng(3))
    b = arrival_times(cfg, np.random.default_rng(3))
    assert np.array_equal(a, b)
    gaps = np.diff(a)
    assert len(a) / cfg.duration_s == pytest.approx(20.0, rel=0.05)
    # Gamma shape k: coefficient of variation 1/sqrt(k) (√2 for burstiness 0.5).
    assert gaps.std() / gaps.mean() == pytest.approx(np.sqrt(2.0), rel=0.1)
    burst = WorkloadConfig(
        request_rate=5.0,
        duration_s=300.0,
        burst_start_s=100.0,
        burst_duration_s=100.0,
        burst_factor=4.0,
        seed=1,
    )
    times = np.asarray([r.arrival_s for r in make_trace(burst, 100)])
    inside = np.sum((times >= 100) & (times < 200)) / 100.0
    outside = np.sum((times < 100) | (times >= 200)) / 200.0
    assert inside / outside == pytest.approx(4.0, rel=0.2)


def test_constant_arrivals_double_with_the_reference_burst():
    """The reference implementation's workload: one request every 1/rate s, the rate doubling
    after 5 s."""
    cfg = WorkloadConfig(
        request_rate=2.0,
        duration_s=10.0,
        arrivals="constant",
        burst_start_s=5.0,
        burst_duration_s=5.0,
        burst_factor=2.0,
    )
    times = arrival_times(cfg, np.random.default_rng(0))
    np.testing.assert_allclose(times[:10], np.arange(1, 11) * 0.5)
    np.testing.assert_allclose(np.diff(times[10:]), 0.25)
    assert len(times) == 10 + 19  # 0.5 … 5.0, then 5.25 … 9.75


def test_eval_slo_end_to_end_writes_json_and_pngs(tmp_path, tiny_checkpoints, capsys):
    import matplotlib.image

    config_json = tiny_checkpoints["gqa_norm_topk_dense_layer"] / "config.json"
    out = tmp_path / "slo"
    code = cli.main(
        [
            "eval",
            "slo",
            "--load-format",
            "dummy",
            "--config",
            str(config_json),
            "--duration",
            "3",
            "--request-rate",
            "10",
            "--modes",
            "off,reactive,auto",
            "--max-batch",
            "2",
            "--max-model-len",
            "32",
            "--prompt-len",
            "4,12",
            "--output-len",
            "4,10",
            "--ladder",
            "0,1",
            "--check-interval",
            "0.5",
            "--window",
            "0.5",
            "--slo-ttft",
            "0.001",
            "--slo-tpot",
            "0.001",
            "--out",
            str(out),
            "--mesh",  # the engine's experts sharded over the 4 test devices
            "expert=4",
        ]
    )
    assert code == 0
    report = json.loads((out / "slo.json").read_text())
    assert [r["mode"] for r in report["runs"]] == ["off", "reactive", "auto"]
    fields = {
        "violation_rate_prefill",
        "violation_rate_decode",
        "goodput_rps",
        "throughput_tokens_per_s",
        "mean_thresholds",
        "timeline",
        "requests",
        "rejected",
        "attainment",
    }
    for run in report["runs"]:
        assert fields <= set(run)
        assert run["requests"] > 0
        # 1-ms SLOs: no request meets both.
        assert run["attainment"]["both"] == 0.0 and 0.0 <= run["attainment"]["ttft"] <= 1.0
    assert report["runs"][0]["mean_thresholds"] == {"prefill": 1.0, "decode": 1.0}
    # Under 1-ms SLOs the reactive rule must brown out; auto only where a level is predicted
    # faster (on this tiny model the levels may time alike), from the table in the report.
    assert report["runs"][1]["mean_thresholds"]["decode"] < 1.0
    assert all(0.0 <= v <= 1.0 for v in report["runs"][2]["mean_thresholds"].values())
    phases = {entry["phase"] for entry in report["step_latency"]}
    assert phases == {"prefill", "decode"}
    assert all(entry["predicted_s"] > 0 for entry in report["step_latency"])
    for name in ("timeline-off.png", "timeline-reactive.png", "timeline-auto.png"):
        assert matplotlib.image.imread(out / name).shape[-1] in (3, 4)
    # The quality side: `off` generated every token at level 1 and gave nothing up.
    off = report["runs"][0]
    assert off["token_thresholds"] == {
        "prefill": {"mean": 1.0, "p10": 1.0},
        "decode": {"mean": 1.0, "p10": 1.0},
    }
    assert off["expected_kl_per_token"] == 0.0
    # What deciding costs: measured for auto's decode steps only.
    assert off["decision"]["share"] is None
    assert report["runs"][2]["decision"]["decode_median_s"] > 0
    # The per-step trace: every step of every mode, with what was predicted at its dispatch.
    for run in report["runs"]:
        with (out / f"trace-{run['mode']}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(run["timeline"]["step_phases"]) > 0
        assert all(float(r["latency_s"]) > 0 for r in rows)
        # Timed only where the read waited for the device (not on this tiny model, often).
        assert all(r["execution_s"] == "" or float(r["execution_s"]) > 0 for r in rows)
        assert all(float(r["predicted_p90_s"]) >= float(r["predicted_s"]) > 0 for r in rows)
        slo_tpot = 0.001  # every step is over it: each has its cause
        decode_rows = [r for r in rows if r["phase"] == "decode"]
        assert all(r["cause"] for r in decode_rows if float(r["latency_s"]) > slo_tpot)
        causes = run["violation_causes"]["decode"]
        if causes["violated_windows"]:  # 1-ms SLOs: each over-SLO step has one cause
            assert sum(causes["over_slo_steps_by_cause"].values()) > 0
    printed = capsys.readouterr().out
    assert "expected KL per token" in printed and "| off |" in printed


def test_eval_accuracy_on_a_mesh_equals_one_device(capsys):
    """The bundled demo model and task, 12 items, exact and browned-out: scores with the
    experts sharded over the 4 test devices equal one device's."""
    reports = []
    for mesh in ([], ["--mesh", "expert=4"]):
        args = ["eval", "accuracy", "--limit", "12", "--thresholds", "1.0,0.5", "--output", "json"]
        assert cli.main(args + mesh) == 0
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    one, sharded = (
        [(r["threshold"], r["accuracy"], r["accuracy_norm"]) for r in rep["rows"]]
        for rep in reports
    )
    assert one == sharded
    assert [t for t, _, _ in one] == [1.0, 0.5]
