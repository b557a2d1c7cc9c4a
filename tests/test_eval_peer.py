"""``eval throughput --peer vllm``: the subprocess protocol, run against a fake peer
interpreter (tests/fake_vllm_peer.py) because CI has no vLLM."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from brownout_jax.cli import main as cli
from brownout_jax.eval import throughput as tp
from brownout_jax.eval.peer_vllm import _bound_cores

FAKE_PEER = Path(__file__).with_name("fake_vllm_peer.py")


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """An executable that runs the fake peer with the arguments the real interpreter gets."""
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_PEER}" "$@"\n')
    path.chmod(0o755)
    return path


def test_vllm_peer_runs_on_the_engines_prompt_ids_and_speedups_use_its_rate(
    tmp_path, tiny_checkpoints, fake_python, monkeypatch, capsys
):
    record = tmp_path / "record.json"
    monkeypatch.setenv("FAKE_PEER_RECORD", str(record))
    monkeypatch.setenv("FAKE_PEER_TOKENS_PER_S", "50")
    model = tiny_checkpoints["gqa_norm_topk_dense_layer"]
    args = ["eval", "throughput", "--model", str(model), "--peer", "vllm"]
    args += ["--peer-python", str(fake_python), "--peer-cores", "0", "--seed", "7"]
    args += ["--num-prompts", "5", "--prompt-len", "4,9", "--max-new-tokens", "3"]
    args += ["--max-batch", "2", "--max-model-len", "32", "--thresholds", "1.0,0.0"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)

    seen = json.loads(record.read_text())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert seen["request"]["prompts"] == tp.make_prompts(vocab, 5, (4, 9), seed=7)
    assert seen["request"]["model"] == str(model)
    assert seen["request"]["max_new_tokens"] == 3
    assert seen["request"]["max_num_seqs"] == 2  # --peer-batch defaults to --max-batch
    assert seen["request"]["max_model_len"] == 32
    assert seen["bind"] == "0" and seen["kv_cache_space"] == "2"
    assert Path(seen["runner"]) == tp.PEER_RUNNER and tp.PEER_RUNNER.is_file()

    rows = {str(r["threshold"]): r for r in report["engine"]}
    assert set(rows) == {"1.0", "0.0"}
    for threshold, row in rows.items():
        assert row["requests"] == 5 and row["output_tokens_per_s"] > 0
        assert report["speedup_vs_vllm"][threshold] == round(row["output_tokens_per_s"] / 50, 2)
    assert report["vllm"]["output_tokens_per_s"] == 50
    assert "token_ids" not in report["vllm"]
    assert report["cores"]["vllm"] == {"cores": 1, "omp_threads_bind": "0", "torch_threads": 1}
    assert report["cores"]["engine"]["cores_allowed"] == len(os.sched_getaffinity(0))
    assert report["agreement_at_threshold_1"]["prompts"] == 5


@pytest.mark.parametrize("problem", ["missing", "not executable", "no such file"])
def test_a_bad_peer_python_exits_2_naming_the_flag(tmp_path, problem, capsys):
    plain = tmp_path / "python"
    plain.write_text("#!/bin/sh\n")
    flag = {
        "missing": [],
        "not executable": ["--peer-python", str(plain)],
        "no such file": ["--peer-python", str(tmp_path / "nope")],
    }[problem]
    assert cli.main(["eval", "throughput", "--peer", "vllm", *flag]) == 2
    assert "--peer-python" in capsys.readouterr().err


def test_dummy_weights_with_a_peer_are_refused(fake_python, capsys):
    args = ["eval", "throughput", "--load-format", "dummy", "--preset", "qwen1.5-moe-a2.7b"]
    assert cli.main([*args, "--peer", "vllm", "--peer-python", str(fake_python)]) == 2
    assert "--peer vllm needs a checkpoint" in capsys.readouterr().err


def test_a_failing_peer_raises_with_its_output_tail(tmp_path, fake_python, monkeypatch):
    monkeypatch.setenv("FAKE_PEER_FAIL", "RuntimeError: no KV cache space")
    config = tp.VllmPeerConfig(python=fake_python, cores="0", batch=2, max_model_len=32)
    with pytest.raises(tp.PeerError, match=r"exit code 3(.|\n)*no KV cache space"):
        tp.vllm_peer(tmp_path, [[1, 2, 3]], 2, config)


def test_agreement_counts_identical_outputs_and_common_prefixes():
    result = tp.agreement([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, 2, 0], [4, 5, 6], [0, 8, 9]])
    assert result == {"prompts": 3, "identical": 1, "mean_common_prefix": round(5 / 9, 3)}


def test_core_bind_lists_round_trip():
    assert _bound_cores("0-1") == 2
    assert _bound_cores("0,2-3") == 3
    assert _bound_cores("0-1|2-3") == 2  # one rank's group
    assert _bound_cores("auto") is None and _bound_cores(None) is None
    assert _bound_cores(tp.all_cores_bind()) == len(os.sched_getaffinity(0))
