"""Checkpoint loading: sharded and single-file HF, fused experts, orbax, conversion, errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import jax
import numpy as np
import pytest
from conftest import PARITY_SPECS, write_tiny_checkpoint
from safetensors.numpy import load_file, save_file

from brownout_jax.checkpoints import CheckpointError, load_model, orbax_store
from brownout_jax.cli import main as cli


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


@pytest.fixture()
def single_file(tmp_path):
    return write_tiny_checkpoint(tmp_path / "single", PARITY_SPECS[0])


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_sharded_checkpoint_loads_same_params_as_single_file(tmp_path, single_file):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", PARITY_SPECS[0], max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    assert (sharded / "model.safetensors.index.json").is_file()
    a = load_model(single_file, "float32", progress=False)
    b = load_model(sharded, "float32", progress=False)
    assert _leaves_equal(a.params, b.params)
    assert a.fingerprint == b.fingerprint


def test_fused_expert_tensors_load_like_per_expert_tensors(tmp_path, single_file):
    """transformers 5 keeps experts fused in memory (gate_up_proj, down_proj); accept both."""
    fused = tmp_path / "fused"
    shutil.copytree(single_file, fused)
    config = json.loads((fused / "config.json").read_text())

    def fuse(tensors):
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp.experts."
            if f"{p}0.gate_proj.weight" not in tensors:
                continue
            e = config["num_experts"]
            gate = [tensors.pop(f"{p}{j}.gate_proj.weight") for j in range(e)]
            up = [tensors.pop(f"{p}{j}.up_proj.weight") for j in range(e)]
            down = [tensors.pop(f"{p}{j}.down_proj.weight") for j in range(e)]
            tensors[p + "gate_up_proj"] = np.stack(
                [np.concatenate([g, u]) for g, u in zip(gate, up, strict=True)]
            )
            tensors[p + "down_proj"] = np.stack(down)

    _rewrite(fused, fuse)
    a = load_model(single_file, "float32", progress=False)
    b = load_model(fused, "float32", progress=False)
    assert _leaves_equal(a.params, b.params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_conversion_round_trip_is_bit_exact(tmp_path, single_file, dtype):
    out = tmp_path / "converted"
    assert cli.main(["convert", "--hf", str(single_file), "--out", str(out), "--dtype", dtype]) == 0
    assert orbax_store.is_converted(out)
    assert (out / "config.json").is_file()
    hf = load_model(single_file, dtype, progress=False)
    converted = load_model(out, dtype, progress=False)
    assert _leaves_equal(hf.params, converted.params)
    assert converted.fingerprint == hf.fingerprint
    assert str(converted.params.embed.dtype) == dtype


def test_convert_refuses_existing_output_and_interrupt_leaves_nothing(
    tmp_path, single_file, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main(["convert", "--hf", str(single_file), "--out", str(out)]) == 2

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_store.ocp.StandardCheckpointer, "save", interrupted)
    target = tmp_path / "never"
    assert cli.main(["convert", "--hf", str(single_file), "--out", str(target)]) == 130
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_bf16_cast_on_load(single_file):
    model = load_model(single_file, "bfloat16", progress=False)
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(model.params)} == {"bfloat16"}


def test_missing_tensor_is_named(single_file):
    _rewrite(single_file, lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*experts\.3\.up_proj"):
        load_model(single_file, "float32", progress=False)


def test_unexpected_tensor_is_named(single_file):
    _rewrite(single_file, lambda t: t.update({"model.layers.0.mlp.bogus": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*mlp\.bogus"):
        load_model(single_file, "float32", progress=False)


def test_wrong_shape_is_named_with_both_shapes(single_file):
    def shrink(tensors):
        name = "model.layers.2.self_attn.q_proj.weight"
        tensors[name] = tensors[name][:, :-1].copy()

    _rewrite(single_file, shrink)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*\(32, 31\).*\(32, 32\)"):
        load_model(single_file, "float32", progress=False)


def test_corrupt_file_is_named(single_file):
    path = single_file / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(single_file, "float32", progress=False)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(single_file, "float32", progress=False)


def test_missing_shard_is_named(tmp_path):
    sharded = write_tiny_checkpoint(tmp_path / "sharded", PARITY_SPECS[1], max_shard_size="20KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(sharded, "float32", progress=False)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        ["brownout-jax", "generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1,2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "checkpoint directory not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_without_tokenizer_needs_ids(single_file, capsys):
    assert load_model(single_file, "float32", progress=False).tokenizer is None
    args = ["generate", "--model", str(single_file), "--max-new-tokens", "3", "--output", "json"]
    assert cli.main([*args, "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert cli.main([*args, "--prompt-ids", "4,5,6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 3 and out["text"] is None


def test_text_prompt_through_tokenizer(tiny_with_tokenizer, capsys):
    code = cli.main(
        [
            "generate",
            "--model",
            str(tiny_with_tokenizer),
            "--prompt",
            "w1 w2 w3 w4",
            "--max-new-tokens",
            "5",
            "--ignore-eos",
            "--output",
            "json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == [3, 4, 5, 6]
    expected = " ".join(f"w{t - 2}" if t >= 2 else "" for t in out["token_ids"]).split()
    assert out["text"].split() == expected


def test_chat_prompt_uses_the_chat_template(tiny_with_tokenizer, capsys):
    args = ["generate", "--model", str(tiny_with_tokenizer), "--max-new-tokens", "2"]
    assert cli.main([*args, "--prompt", "w5 w6", "--chat", "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_token_ids"] == [3, 7, 8, 4, 5]  # w1 w5 w6 w2 w3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_predicted_from_the_configs_are_the_loaded_ones(tiny_checkpoints, dtype):
    """What the engine compiles while the weights load: the loaded tree, shapes and dtypes."""
    from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir
    from brownout_jax.checkpoints.loader import abstract_model_params

    cases = [(path, None) for path in tiny_checkpoints.values()]
    cases.append((demo_model_dir(), demo_united_dir("similarity")))
    for directory, united in cases:
        predicted = abstract_model_params(directory, dtype, united)
        loaded = load_model(directory, dtype, progress=False, united=united).params
        assert jax.tree_util.tree_structure(predicted) == jax.tree_util.tree_structure(loaded)
        leaves = zip(
            jax.tree_util.tree_leaves(predicted), jax.tree_util.tree_leaves(loaded), strict=True
        )
        for a, b in leaves:
            assert (a.shape, a.dtype) == (b.shape, b.dtype), directory


def test_united_experts_are_stacked_while_loading_exactly_as_attached_afterwards():
    """The HF loader builds each (E + U) stack once; the result equals loading the originals
    and attaching the united experts (the path converted checkpoints take)."""
    import jax

    from brownout_jax.checkpoints import load_model
    from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir
    from brownout_jax.checkpoints.united_store import load_united
    from brownout_jax.united.united import attach_united

    united_dir = demo_united_dir("contiguous")
    stacked = load_model(demo_model_dir(), "float32", progress=False, united=united_dir)
    plain = load_model(demo_model_dir(), "float32", progress=False)
    united, _ = load_united(united_dir, plain.config, plain.fingerprint, plain.dtype)
    attached = attach_united(plain.params, plain.config, united)
    for a, b in zip(
        jax.tree_util.tree_leaves(stacked.params), jax.tree_util.tree_leaves(attached), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
