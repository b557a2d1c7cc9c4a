"""United experts: grouping, average init, distillation, storage, CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PARITY_SPECS, write_tiny_checkpoint

from brownout_jax.checkpoints import CheckpointError, load_model
from brownout_jax.checkpoints.united_store import load_united, save_united
from brownout_jax.cli import main as cli
from brownout_jax.united.calibration import CalibrationDataError, load_calibration_texts
from brownout_jax.united.united import (
    average_init,
    contiguous_groups,
    members_of,
    num_groups,
    similarity_groups,
)


def test_contiguous_groups_follow_the_paper():
    assert contiguous_groups(60, 4).tolist() == [e // 4 for e in range(60)]
    groups = members_of(contiguous_groups(60, 8))
    assert len(groups) == num_groups(60, 8) == 8
    assert [len(g) for g in groups] == [8] * 7 + [4]  # a last short group


def test_similarity_groups_are_balanced_and_find_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 6, 8))
    # Expert e is a noisy copy of centre perm[e] % 4: four hidden clusters of four.
    perm = rng.permutation(16)
    outputs = np.stack(
        [centres[perm[e] % 4] + 0.01 * rng.standard_normal((6, 8)) for e in range(16)]
    )
    group = similarity_groups(outputs, 4)
    assert sorted(np.bincount(group).tolist()) == [4, 4, 4, 4]
    for members in members_of(group):
        assert len({perm[e] % 4 for e in members}) == 1
    short = similarity_groups(rng.standard_normal((10, 3, 5)), 4)
    assert sorted(np.bincount(short).tolist()) == [2, 4, 4]


def test_average_init_is_the_member_mean(tiny_moe):
    config, params, *_ = tiny_moe
    experts = params.layers[0].mlp.experts
    group = contiguous_groups(config.num_experts, 4)
    init = average_init(experts, group)
    np.testing.assert_allclose(
        init.w_up[2], np.mean(np.asarray(experts.w_up[8:12]), axis=0), rtol=1e-6
    )


def test_distillation_beats_the_average_init(tiny_moe):
    *_, reports = tiny_moe
    assert len(reports) == 3 * 4
    for report in reports:
        assert np.isfinite(report.final_mse)
        assert report.final_mse < report.init_mse


def test_store_round_trip_and_mismatches(tmp_path, tiny_moe):
    config, _, united, _, reports = tiny_moe
    out = save_united(
        united,
        tmp_path / "u",
        way=4,
        grouping="contiguous",
        source_fingerprint="abc",
        moe_layers=config.moe_layers,
        reports=reports,
        calibration={"random_tokens": 1024},
    )
    restored, manifest = load_united(out, config, "abc", jnp.float32, expected_way=4)
    for a, b in zip(
        jax.tree_util.tree_leaves(united), jax.tree_util.tree_leaves(restored), strict=True
    ):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert manifest["mse"][0]["final_mse"] == reports[0].final_mse
    with pytest.raises(CheckpointError, match=r"made for checkpoint abc.*this model is xyz"):
        load_united(out, config, "xyz", jnp.float32)
    with pytest.raises(CheckpointError, match=r"way 4.*way 8"):
        load_united(out, config, "abc", jnp.float32, expected_way=8)
    with pytest.raises(CheckpointError, match="not a united-experts directory"):
        load_united(tmp_path, config, "abc", jnp.float32)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("unite") / "model", PARITY_SPECS[2])


def test_unite_cli_then_generate_with_brownout(tmp_path, hf_model, capsys):
    out = tmp_path / "united"
    code = cli.main(
        [
            "unite",
            "--model",
            str(hf_model),
            "--way",
            "4",
            "--grouping",
            "similarity",
            "--calib-random-tokens",
            "512",
            "--seq-len",
            "64",
            "--max-steps",
            "40",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    manifest = json.loads((out / "united_manifest.json").read_text())
    assert manifest["way"] == 4 and manifest["grouping"] == "similarity"
    assert manifest["source_fingerprint"] == load_model(hf_model, progress=False).fingerprint
    capsys.readouterr()

    base = [
        "generate",
        "--model",
        str(hf_model),
        "--prompt-ids",
        "1,2,3,4",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--output",
        "json",
        "--dtype",
        "float32",
    ]
    assert cli.main(base) == 0
    exact = json.loads(capsys.readouterr().out)
    assert cli.main([*base, "--united", str(out), "--threshold", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == exact["token_ids"]

    assert cli.main([*base, "--united", str(out), "--threshold", "0.45"]) == 0
    captured = capsys.readouterr()
    assert "0.45 is not on the ladder; using 0.4" in captured.err
    browned = json.loads(captured.out)
    assert browned["thresholds"] == {"prefill": 0.4, "decode": 0.4}
    assert len(browned["token_ids"]) == 6

    assert cli.main([*base, "--threshold", "0.5"]) == 2
    assert "--united" in capsys.readouterr().err


def test_united_for_another_checkpoint_is_refused(tmp_path, hf_model, tiny_moe, capsys):
    config, _, united, _, reports = tiny_moe
    other = save_united(
        united,
        tmp_path / "other",
        way=4,
        grouping="contiguous",
        source_fingerprint="0" * 16,
        moe_layers=config.moe_layers,
        reports=reports,
        calibration={},
    )
    code = cli.main(
        [
            "generate",
            "--model",
            str(hf_model),
            "--united",
            str(other),
            "--prompt-ids",
            "1,2",
            "--max-new-tokens",
            "2",
        ]
    )
    assert code == 2
    assert "made for checkpoint" in capsys.readouterr().err


def test_calibration_formats(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first paragraph\n\nsecond one\n")
    assert load_calibration_texts(plain) == ["first paragraph", "second one"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "x y"}\n{"instruction": "do", "input": "", "output": "done"}\n')
    assert load_calibration_texts(jsonl) == ["x y", "do\ndone"]
    alpaca = tmp_path / "c.json"
    alpaca.write_text(
        json.dumps([{"instruction": "Say hi", "input": "to Bob", "output": "Hi Bob"}])
    )
    assert load_calibration_texts(alpaca) == ["Say hi\nto Bob\nHi Bob"]
    sharegpt = tmp_path / "d.json"
    sharegpt.write_text(
        json.dumps(
            [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
        )
    )
    assert load_calibration_texts(sharegpt) == ["q\na"]
    broken = tmp_path / "e.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CalibrationDataError, match=r"e\.jsonl:2"):
        load_calibration_texts(broken)
