"""The vLLM side-by-side script's host logic (no vLLM here): both servers get the same
benchmark, the flags the comparison rests on are passed, the table reads vLLM's results."""

from __future__ import annotations

from pathlib import Path

import pytest

from brownout_jax.eval import serve_compare as sc


def _config(tmp_path, **changes) -> sc.CompareConfig:
    fields = dict(
        peer_python=Path("/opt/vllm/bin/python"),
        model="/ckpt/demo",
        united="/ckpt/demo/united",
        modes=("off", "auto"),
        out_dir=tmp_path,
        goodput=("ttft:500", "tpot:50"),
    )
    fields.update(changes)
    return sc.CompareConfig(**fields)


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_server_gets_the_same_benchmark(tmp_path):
    cfg = _config(tmp_path)
    first, second = sc.bench_command(cfg, 1111, "a.json"), sc.bench_command(cfg, 2222, "b.json")
    strip = {"--base-url", "--result-filename"}

    def without(command):
        return [c for i, c in enumerate(command) if c not in strip and command[i - 1] not in strip]

    assert without(first) == without(second)
    for flag in ("--ignore-eos", "--save-result"):
        assert flag in first
    assert _flag(first, "--burstiness") == "0.5" and _flag(first, "--seed") == "0"
    assert _flag(first, "--percentile-metrics") == "ttft,tpot,e2el"
    assert first[first.index("--goodput") + 1 : first.index("--goodput") + 3] == [
        "ttft:500",
        "tpot:50",
    ]
    assert _flag(first, "--tokenizer") == "/ckpt/demo" and _flag(first, "--model") == "model"


def test_servers_serve_one_name_and_batch_and_the_controller_takes_the_goodput_slos(tmp_path):
    cfg = _config(tmp_path, max_model_len=256)
    ours = sc.brownout_server_command(cfg, "auto", 9000)
    peer = sc.vllm_server_command(cfg, 9001)
    assert _flag(ours, "--served-model-name") == _flag(peer, "--served-model-name") == "model"
    assert _flag(ours, "--max-batch") == _flag(peer, "--max-num-seqs") == "16"
    assert _flag(ours, "--max-model-len") == _flag(peer, "--max-model-len") == "256"
    assert _flag(ours, "--slo-ttft") == "0.5" and _flag(ours, "--slo-tpot") == "0.05"
    assert _flag(ours, "--brownout") == "auto" and "--no-grpc" in ours
    assert "--no-enable-prefix-caching" in peer


def test_table_reads_vllm_results():
    result = {
        "completed": 31,
        "failed": 1,
        "request_throughput": 3.9,
        "output_throughput": 120.5,
        "request_goodput": 3.1,
        "mean_ttft_ms": 45.0,
        "p99_ttft_ms": 310.0,
        "mean_tpot_ms": 12.25,
        "p99_tpot_ms": 30.0,
        "mean_e2el_ms": 420.0,
        "p99_e2el_ms": 900.0,
    }
    table = sc.format_table([("vllm", result)], "50,90,99").splitlines()
    assert "P99" in table[0]
    assert table[2] == (
        "| vllm | 31 / 1 | 3.90 | 120.5 | 3.10 | 45.0 / 310 | 12.2 / 30.0 | 420 / 900 |"
    )


def test_peer_python_must_exist(tmp_path):
    with pytest.raises(SystemExit):
        sc.parse_args(["--peer-python", str(tmp_path / "missing"), "--model", "x"])
