"""Quality under brownout: KL / agreement / greedy divergence, per-layer sensitivity, exempt
layers chosen from it and stored with the united experts, and the CLI around them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from brownout_jax.cli import main as cli
from brownout_jax.cli.options import brownout_options, controller_from_args
from brownout_jax.engine.metrics import StepRecord
from brownout_jax.engine.phase import Phase
from brownout_jax.engine.quality_costs import QualityCosts
from brownout_jax.eval.quality import (
    EXACT,
    BrownoutPhase,
    BrownoutSetting,
    QualityConfig,
    measure_settings,
    teacher_forced,
    token_divergence,
)
from brownout_jax.eval.quality_report import quality_cost, summarize
from brownout_jax.eval.sensitivity import layer_sensitivity
from brownout_jax.model.transformer import forward_logits
from brownout_jax.united.exemption import (
    ExemptionChoice,
    LayerSensitivity,
    edge_layers,
    rank_layers,
    resolve_exempt_layers,
)

CFG = QualityConfig(
    window_tokens=32, prompt_tokens=12, batch_size=4, num_prompts=4, continuation_tokens=6
)
THRESHOLDS = (1.0, 0.75, 0.5, 0.25, 0.0)


def _windows(config, count: int = 8, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, (count, CFG.window_tokens)).tolist()


@pytest.fixture(scope="module")
def ladder_measurements(tiny_moe):
    """Every threshold of a ladder (full brownout) plus prefill-only and decode-only at 0.5,
    on 7 windows (the last batch has a padded row)."""
    config, _, _, browned, _ = tiny_moe
    settings = [BrownoutSetting(t) for t in THRESHOLDS] + [
        BrownoutSetting(0.5, BrownoutPhase.PREFILL),
        BrownoutSetting(0.5, BrownoutPhase.DECODE),
    ]
    return measure_settings(browned, config, _windows(config, 7), settings, CFG)


def test_threshold_one_gives_zero_kl_and_full_agreement(ladder_measurements):
    exact, *browned = ladder_measurements[: len(THRESHOLDS)]
    assert exact.setting.threshold == 1.0
    assert exact.kl.shape == (7, CFG.scored_tokens)
    assert np.all(exact.kl == 0.0)  # exactly, not approximately
    assert exact.agree.all()
    assert np.all(exact.nll_browned == exact.nll_exact)
    assert np.all(exact.first_divergence == CFG.continuation_tokens)
    assert exact.bytes_read_fraction() == 1.0
    row = summarize(exact, "tiny")
    assert (row.kl_mean, row.top1_agreement, row.identical_continuations) == (0.0, 1.0, 1.0)
    # …and the measure can tell: full brownout moves the predictions.
    assert browned[-1].kl.mean() > 0.05 and browned[-1].agree.mean() < 0.9


def test_kl_non_increasing_in_threshold(ladder_measurements):
    """Raising the threshold only shrinks the set of redirected experts (the hot set grows;
    a group's cold experts only get fewer), so the model moves back towards the exact one.
    Per token that is not guaranteed (errors of several layers can cancel); the mean over
    the windows is, on this seeded model, strictly ordered."""
    ladder = ladder_measurements[: len(THRESHOLDS)]
    kl = [m.kl.mean() for m in ladder]
    agreement = [m.agree.mean() for m in ladder]
    read = [m.bytes_read_fraction() for m in ladder]
    assert all(np.isfinite(kl))
    assert kl == sorted(kl), f"KL by threshold {THRESHOLDS}: {kl}"
    assert agreement == sorted(agreement, reverse=True)
    assert read == sorted(read, reverse=True)  # lower thresholds read fewer expert bytes
    assert read[-1] < 0.8


def test_prefill_only_and_decode_only_brown_out_only_their_phase(ladder_measurements):
    both = ladder_measurements[THRESHOLDS.index(0.5)]
    prefill, decode = ladder_measurements[len(THRESHOLDS) :]
    # Decode-only: the prefill is the exact one; every layer's decode steps read less.
    assert np.array_equal(decode.experts_prefill, decode.exact_experts_prefill)
    assert np.all(decode.experts_decode < decode.exact_experts_decode)
    # Prefill-only: the prefill reads less; decode steps route exactly in the first MoE layer
    # (later layers attend over a KV cache the browned-out prefill wrote, so theirs move).
    assert np.all(prefill.experts_prefill < prefill.exact_experts_prefill)
    assert prefill.experts_decode[0] == prefill.exact_experts_decode[0]
    assert np.array_equal(both.experts_prefill, prefill.experts_prefill)
    for m in (prefill, decode):
        assert 0 < m.kl.mean() < both.kl.mean() * 1.5


def test_teacher_forced_log_probs_equal_the_full_sequence_forward(tiny_moe):
    """Exact prefill + teacher-forced decode predict what one forward over the window does."""
    config, _, _, browned, _ = tiny_moe
    tokens = jnp.asarray(_windows(config, 3, seed=5), jnp.int32)
    out = teacher_forced(
        browned,
        tokens,
        jnp.ones(3, bool),
        config=config,
        prompt_len=CFG.prompt_tokens,
        prefill_options=EXACT,
        decode_options=EXACT,
    )
    logits = forward_logits(browned, config, tokens, jnp.full(3, CFG.window_tokens))
    ref = jax.nn.log_softmax(logits, axis=-1)[:, CFG.prompt_tokens - 1 : -1]
    assert out.logprobs.shape == ref.shape
    assert rel_err(out.logprobs, ref) < 1e-5


def test_kl_and_agreement_equal_a_float64_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 5, 50)) * 3
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(a, jnp.float32)), np.float64)
    logq = np.asarray(jax.nn.log_softmax(jnp.asarray(b, jnp.float32)), np.float64)
    targets = rng.integers(0, 50, (3, 5))
    div = token_divergence(
        jnp.asarray(logp, jnp.float32), jnp.asarray(logq, jnp.float32), jnp.asarray(targets)
    )
    ref = np.sum(np.exp(logp) * (logp - logq), axis=-1)
    assert rel_err(div.kl, ref) < 1e-5
    assert np.array_equal(np.asarray(div.agree), logp.argmax(-1) == logq.argmax(-1))
    picked = -np.take_along_axis(logq, targets[..., None], -1)[..., 0]
    assert rel_err(div.nll_browned, picked) < 1e-6


def _planted(tiny_moe, layer: int):
    """The tiny model with layer ``layer``'s united experts made useless (output ×25)."""
    config, _, _, browned, _ = tiny_moe
    layers = list(browned.layers)
    moe = layers[layer].mlp
    e = config.num_experts
    w_down = moe.experts.w_down.at[e:].multiply(25.0)
    layers[layer] = layers[layer].replace(
        mlp=moe.replace(experts=moe.experts.replace(w_down=w_down))
    )
    return browned.replace(layers=tuple(layers))


def test_auto_exemption_is_no_worse_than_any_k_subset(tiny_moe):
    """Layer 1 is planted as the sensitive one. The layers chosen by KL removed per byte kept
    give, for K = 1 and 2, a total KL no larger than any other K layers exempted."""
    config = tiny_moe[0]
    params = _planted(tiny_moe, 1)
    windows = _windows(config, 4, seed=2)
    cfg = dataclasses.replace(CFG, num_prompts=0)
    layers = layer_sensitivity(params, config, windows, 0.0, cfg)
    assert [s.layer for s in layers] == list(config.moe_layers)
    assert all(s.bytes_saved_per_token > 0 for s in layers)
    ranking = rank_layers(layers)
    assert ranking[0] == 1
    assert max(layers, key=lambda s: s.kl).layer == 1
    subsets = [s for k in (1, 2) for s in itertools.combinations(config.moe_layers, k)]
    settings = [BrownoutSetting(0.0, BrownoutPhase.BOTH, s) for s in subsets]
    total = {
        s: m.kl.mean()
        for s, m in zip(
            subsets, measure_settings(params, config, windows, settings, cfg), strict=True
        )
    }
    for k in (1, 2):
        chosen = tuple(sorted(ranking[:k]))
        others = [total[s] for s in subsets if len(s) == k]
        assert total[chosen] <= min(others), (k, chosen, total)
    # Exempting the planted layer removes most of the damage.
    assert total[(1,)] < 0.5 * total[(0,)]


def test_rank_and_resolve_exempt_layers():
    layers = (
        LayerSensitivity(0, kl=0.10, kl_stderr=0.01, bytes_saved_per_token=100.0),
        LayerSensitivity(1, kl=0.30, kl_stderr=0.01, bytes_saved_per_token=100.0),
        LayerSensitivity(2, kl=0.05, kl_stderr=0.01, bytes_saved_per_token=10.0),  # 0.005/B
        LayerSensitivity(3, kl=0.01, kl_stderr=0.01, bytes_saved_per_token=0.0),  # free
    )
    ranking = rank_layers(layers)
    assert ranking == (3, 2, 1, 0)
    choice = ExemptionChoice(threshold=0.5, k=2, ranking=ranking, layers=layers, text="t")
    manifest = {"moe_layers": [0, 1, 2, 3], "exemption": choice.to_manifest()}
    moe = (0, 1, 2, 3)
    assert resolve_exempt_layers("auto", 0, moe, manifest, "D") == (2, 3)
    assert resolve_exempt_layers("auto:3", 0, moe, manifest, "D") == (1, 2, 3)
    assert resolve_exempt_layers("3,0", 0, moe, manifest, "D") == (0, 3)
    assert resolve_exempt_layers(None, 1, moe, manifest, "D") == (0, 3)
    assert resolve_exempt_layers(None, 0, moe) == ()
    assert edge_layers(tuple(range(24)), 4) == (0, 1, 22, 23)
    assert edge_layers(moe, 3) == (0, 1, 3)
    with pytest.raises(ValueError, match="eval sensitivity"):
        resolve_exempt_layers("auto", 0, moe, {"moe_layers": [0, 1, 2, 3]}, "D")
    with pytest.raises(ValueError, match="auto:9"):
        resolve_exempt_layers("auto:9", 0, moe, manifest, "D")
    with pytest.raises(ValueError, match=r"\[7\] are not MoE layers"):
        resolve_exempt_layers("0,7", 0, moe, manifest, "D")
    with pytest.raises(ValueError, match="not both"):
        resolve_exempt_layers("auto", 1, moe, manifest, "D")
    with pytest.raises(ValueError, match="malformed"):
        resolve_exempt_layers("auto", 0, moe, {"exemption": {"k": 1}}, "D")


def test_quality_cost_weights_each_steps_tokens_by_its_thresholds_kl():
    table = {
        "united": {"set": "/somewhere/set"},
        "rows": [
            {"united": "set", "phase": "both", "threshold": t, "kl_mean": kl}
            for t, kl in ((1.0, 0.0), (0.5, 0.2), (0.0, 0.6))
        ]
        + [{"united": "set", "phase": "decode", "threshold": 0.5, "kl_mean": 0.1}],
    }
    steps = [
        StepRecord(0.0, "prefill", 0.1, rows=2, prefill_threshold=0.5, decode_threshold=1.0),
        StepRecord(0.1, "decode", 0.1, rows=4, prefill_threshold=0.5, decode_threshold=0.5),
        StepRecord(0.2, "decode", 0.1, rows=4, prefill_threshold=0.0, decode_threshold=1.0),
        StepRecord(0.3, "prefill", 0.1, rows=2, prefill_threshold=0.1, decode_threshold=1.0),
    ]
    cost = quality_cost(steps, table, None)
    # prefill 0.5 → 'both' 0.5 (no prefill-only rows); decode 0.5 → decode-only row;
    # decode at 1 costs nothing; prefill 0.1 → nearest, 0.0.
    expected = (2 * 0.2 + 4 * 0.1 + 4 * 0.0 + 2 * 0.6) / 12
    assert cost == {"united": "set", "tokens": 12, "mean_kl": pytest.approx(expected)}
    two_sets = {**table, "rows": [*table["rows"], {**table["rows"][0], "united": "other"}]}
    with pytest.raises(ValueError, match="none is the served"):
        quality_cost(steps, two_sets, "/elsewhere")


def test_cli_quality_names_the_malformed_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    assert cli.main(["eval", "quality", "--text", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3" in err and "Traceback" not in err
    assert cli.main(["eval", "quality", "--phases", "sideways"]) == 2
    assert "--phases" in capsys.readouterr().err


def test_cli_quality_and_sensitivity_on_the_demo(tmp_path, capsys):
    """End to end on the bundled demo: JSON rows and a PNG; the sensitivity ranking stored in
    (a copy of) its united experts' manifest is what `--exempt-layers auto` then applies."""
    import matplotlib.image

    from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir
    from brownout_jax.checkpoints.united_store import read_united_manifest

    united = tmp_path / "united"
    shutil.copytree(demo_united_dir("contiguous"), united)
    manifest = json.loads((united / "united_manifest.json").read_text())
    manifest.pop("exemption", None)  # as an older manifest: still loads
    (united / "united_manifest.json").write_text(json.dumps(manifest))
    small = ["--windows", "2", "--window-tokens", "24", "--prompt-tokens", "8", "--batch-size", "2"]
    png = tmp_path / "q.png"
    args = [
        "eval",
        "quality",
        "--united",
        str(united),
        "--thresholds",
        "1,0",
        "--num-prompts",
        "2",
        "--continuation-tokens",
        "3",
        "--output",
        "json",
        "--plot",
        str(png),
        "--store",
    ]
    assert cli.main(args + small) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["threshold"]: r for r in report["rows"]}
    assert rows[1.0]["kl_mean"] == 0.0 and rows[1.0]["top1_agreement"] == 1.0
    assert rows[0.0]["kl_mean"] > 0 and rows[0.0]["expert_bytes_read"] < 1.0
    assert rows[0.0]["tokens"] == 2 * 16 and report["united"] == {"united": str(united)}
    assert matplotlib.image.imread(png).shape[-1] in (3, 4)
    # --store: the set's KL per level is in its manifest (full-brownout rows stand in for
    # each phase), and the controller of serve / eval slo reads it from there.
    stored = QualityCosts.from_manifest(read_united_manifest(united))
    for phase in Phase:
        assert stored.kl(phase, 0.0) == pytest.approx(rows[0.0]["kl_mean"])
        assert stored.kl(phase, 0.5) == pytest.approx(rows[0.0]["kl_mean"] / 2)
    parsed = cli.build_parser().parse_args(["serve", "--united", str(united)])
    assert controller_from_args(parsed, read_united_manifest(united)).quality == stored

    args = [
        "eval",
        "sensitivity",
        "--united",
        str(united),
        "--threshold",
        "0",
        "--k",
        "2",
        "--save",
        "1",
        "--output",
        "json",
    ]
    assert cli.main(args + small) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ranking = report["ranking"]
    assert sorted(ranking) == [0, 1, 2, 3]
    assert {r["rule"] for r in report["comparison"]} == {"none", "auto", "edge"}
    stored = read_united_manifest(united)["exemption"]
    assert stored["ranking"] == ranking and stored["k"] == 1
    moe = (0, 1, 2, 3)
    assert resolve_exempt_layers("auto", 0, moe, read_united_manifest(united), united) == (
        ranking[0],
    )
    # generate resolves the same choice from the manifest it loads with the united experts.
    parsed = cli.build_parser().parse_args(
        [
            "generate",
            "--united",
            str(united),
            "--threshold",
            "0",
            "--exempt-layers",
            "auto:2",
            "--model",
            str(demo_model_dir()),
            "x",
        ]
    )
    prefill, decode = brownout_options(parsed, _demo_config(), read_united_manifest(united))
    assert prefill.exempt_layers == decode.exempt_layers == tuple(sorted(ranking[:2]))


def _demo_config():
    from brownout_jax.checkpoints.demo_model import demo_model_dir
    from brownout_jax.model.config import ModelConfig

    return ModelConfig.from_pretrained_dir(demo_model_dir())


def test_eval_slo_reports_the_quality_cost_of_each_mode(tmp_path, tiny_checkpoints, capsys):
    """Every step of `fixed=0` runs at threshold 0 and of `off` at 1: the run's mean KL per
    token is the table's KL at 0, resp. nothing."""
    table = tmp_path / "quality.json"
    rows = [
        {"united": "s", "phase": "both", "threshold": t, "kl_mean": kl}
        for t, kl in ((1.0, 0.0), (0.5, 0.25), (0.0, 0.75))
    ]
    table.write_text(json.dumps({"united": {"s": "/x"}, "rows": rows}))
    out = tmp_path / "slo"
    config_json = tiny_checkpoints["gqa_norm_topk_dense_layer"] / "config.json"
    args = ["eval", "slo", "--load-format", "dummy", "--config", str(config_json)]
    args += ["--duration", "2", "--request-rate", "8", "--modes", "off,fixed=0", "--max-batch", "2"]
    args += ["--max-model-len", "32", "--prompt-len", "4,8", "--output-len", "2,4", "--ladder"]
    args += ["0,1", "--quality-table", str(table), "--out", str(out)]
    assert cli.main(args) == 0
    runs = {r["mode"]: r for r in json.loads((out / "slo.json").read_text())["runs"]}
    assert runs["off"]["quality_cost"]["mean_kl"] == 0.0
    assert runs["fixed=0"]["quality_cost"]["mean_kl"] == pytest.approx(0.75)
    assert runs["fixed=0"]["quality_cost"]["tokens"] > 0
    assert "KL (quality table)" in capsys.readouterr().out


def test_windows_join_texts_with_the_separator_and_have_equal_length():
    from brownout_jax.united.calibration import pack_token_windows

    class Chars:  # one token per character: ids are code points
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    windows = pack_token_windows(["abcde", "fg", "hijklmn"], Chars(), 4, 10, separator_ids=[0])
    # a b c d | e 0 f g | 0 h i j | k l m n: a separator between every two texts
    assert windows == [
        [97, 98, 99, 100],
        [101, 0, 102, 103],
        [0, 104, 105, 106],
        [107, 108, 109, 110],
    ]
    assert len(pack_token_windows(["abcdefghij"], Chars(), 4, 1)) == 1
    with pytest.raises(ValueError, match="at least 2"):
        pack_token_windows(["ab"], Chars(), 1, 3)


def test_auto_rank_among_all_subsets():
    from brownout_jax.eval.sensitivity import RuleComparison, rank_among_subsets

    def row(rule, exempt, kl):
        return RuleComparison(len(exempt), rule, exempt, kl, 0.0, 1.0, 0.5, None, None)

    rows = [row("auto", (0,), 0.2), row("edge", (0,), 0.2), row("other", (1,), 0.1)]
    rows += [row("other", (2,), 0.3)]
    assert rank_among_subsets(rows, 1) == (2, 3)  # one subset beats auto
    assert rank_among_subsets(rows[:2], 1) is None  # not every subset measured
