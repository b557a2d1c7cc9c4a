"""Side by side with vLLM, one client for both: ``vllm serve`` and ``brownout-jax serve`` on the
same checkpoint, started in turn, each driven by vLLM's own serve benchmark (same seed, same
random prompts, same request rate and burstiness) through the OpenAI API; one table.

    python -m brownout_jax.eval.serve_compare --peer-python /path/to/vllm-venv/bin/python \\
        [--model DIR] [--modes off,auto] [--num-prompts 64] [--request-rate 4] ...

The project does not depend on vLLM: the peer's interpreter runs vLLM's server and benchmark
(eval/vllm_bench_serve.py) as subprocesses. Each server gets every core of this machine in
turn (vLLM: VLLM_CPU_OMP_THREADS_BIND); the benchmark client shares them with it. Ctrl-C stops
the server being measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVED_NAME = "model"  # both servers answer to it, so the benchmark sends the same requests
BENCH_DRIVER = Path(__file__).with_name("vllm_bench_serve.py")


@dataclasses.dataclass(frozen=True, slots=True)
class CompareConfig:
    peer_python: Path
    model: str
    united: str | None
    modes: tuple[str, ...]  # brownout-jax --brownout values, one run each
    out_dir: Path
    num_prompts: int = 64
    input_len: int = 64
    output_len: int = 32
    request_rate: float = 4.0
    burstiness: float = 0.5
    seed: int = 0
    goodput: tuple[str, ...] = ("ttft:1000", "tpot:200")  # ms, vLLM's --goodput syntax
    percentile_metrics: str = "ttft,tpot,e2el"
    metric_percentiles: str = "50,90,99"
    num_warmups: int = 4
    max_batch: int = 16
    max_model_len: int | None = None  # None: each server's default (the model's positions)
    ladder: str | None = None  # brownout-jax --ladder; None: serve's default
    peer_cores: str = ""  # VLLM_CPU_OMP_THREADS_BIND; "" = every core
    peer_dtype: str = "auto"
    peer_kv_space_gib: int = 2
    slo_ttft_s: float | None = None  # brownout-jax controller; None: from --goodput
    slo_tpot_s: float | None = None
    startup_timeout_s: float = 1800.0
    skip_vllm: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_cores_bind() -> str:
    cores = sorted(os.sched_getaffinity(0))
    return (
        f"{cores[0]}-{cores[-1]}"
        if cores == list(range(cores[0], cores[-1] + 1))
        else ",".join(map(str, cores))
    )


def goodput_seconds(goodput: tuple[str, ...], key: str) -> float | None:
    for item in goodput:
        name, _, value = item.partition(":")
        if name == key:
            return float(value) / 1000
    return None


def vllm_server_command(cfg: CompareConfig, port: int) -> list[str]:
    command = [
        str(cfg.peer_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        cfg.model,
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(cfg.max_batch),
        "--dtype",
        cfg.peer_dtype,
        "--seed",
        str(cfg.seed),
        "--no-enable-prefix-caching",  # the engine has no prefix cache either
    ]
    if cfg.max_model_len is not None:
        command += ["--max-model-len", str(cfg.max_model_len)]
    return command


def brownout_server_command(cfg: CompareConfig, mode: str, port: int) -> list[str]:
    slo_ttft = cfg.slo_ttft_s or goodput_seconds(cfg.goodput, "ttft") or 1.0
    slo_tpot = cfg.slo_tpot_s or goodput_seconds(cfg.goodput, "tpot") or 0.2
    command = [
        sys.executable,
        "-m",
        "brownout_jax.cli",
        "serve",
        "--model",
        cfg.model,
        "--no-grpc",
        "--http-port",
        str(port),
        "--served-model-name",
        SERVED_NAME,
        "--brownout",
        mode,
        "--slo-ttft",
        str(slo_ttft),
        "--slo-tpot",
        str(slo_tpot),
        "--max-batch",
        str(cfg.max_batch),
    ]
    if cfg.united is not None:
        command += ["--united", cfg.united]
    if cfg.max_model_len is not None:
        command += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.ladder is not None:
        command += ["--ladder", cfg.ladder]
    return command


def bench_command(cfg: CompareConfig, port: int, result_name: str) -> list[str]:
    return [
        str(cfg.peer_python),
        str(BENCH_DRIVER),
        "--backend",
        "openai",
        "--base-url",
        f"http://127.0.0.1:{port}",
        "--endpoint",
        "/v1/completions",
        "--model",
        SERVED_NAME,
        "--tokenizer",
        cfg.model,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(cfg.input_len),
        "--random-output-len",
        str(cfg.output_len),
        "--num-prompts",
        str(cfg.num_prompts),
        "--seed",
        str(cfg.seed),
        "--request-rate",
        str(cfg.request_rate),
        "--burstiness",
        str(cfg.burstiness),
        "--ignore-eos",
        "--temperature",
        "0",
        "--num-warmups",
        str(cfg.num_warmups),
        "--goodput",
        *cfg.goodput,
        "--percentile-metrics",
        cfg.percentile_metrics,
        "--metric-percentiles",
        cfg.metric_percentiles,
        "--save-result",
        "--result-dir",
        str(cfg.out_dir),
        "--result-filename",
        result_name,
    ]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until GET /health answers 200; raises if the server exits or times out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{url}/health", timeout=5) as response,
        ):
            if response.status == 200:
                return time.monotonic() - start
        time.sleep(2)
    raise TimeoutError(f"{url} was not healthy within {timeout_s:.0f}s")


def _save_metrics(url: str, path: Path) -> None:
    """The server's Prometheus text after the run (brownout-jax: thresholds, steps, finishes),
    where it has /metrics."""
    with (
        contextlib.suppress(urllib.error.URLError, OSError),
        urllib.request.urlopen(f"{url}/metrics", timeout=10) as response,
    ):
        path.write_bytes(response.read())


def stop_server(process: subprocess.Popen, timeout_s: float = 120) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def run_one(cfg: CompareConfig, name: str, server: list[str], env: dict, port: int) -> dict:
    """Starts one server, benchmarks it, stops it; returns vLLM's saved result."""
    log_path = cfg.out_dir / f"{name}.server.log"
    result_name = f"{name}.json"
    print(f"[{name}] starting: {' '.join(server)}", flush=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            server, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        try:
            ready_s = wait_healthy(f"http://127.0.0.1:{port}", process, cfg.startup_timeout_s)
            print(f"[{name}] ready after {ready_s:.0f}s; benchmarking", flush=True)
            bench = bench_command(cfg, port, result_name)
            (cfg.out_dir / f"{name}.command").write_text(
                " ".join(server) + "\n" + " ".join(bench) + "\n"
            )
            subprocess.run(bench, check=True)
            _save_metrics(f"http://127.0.0.1:{port}", cfg.out_dir / f"{name}.metrics.txt")
        finally:
            code = stop_server(process)
    result = json.loads((cfg.out_dir / result_name).read_text())
    result["server_exit_code"] = code
    result["server_ready_s"] = round(ready_s, 1)
    return result


def run_compare(cfg: CompareConfig) -> list[tuple[str, dict]]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    cores = cfg.peer_cores or all_cores_bind()
    runs: list[tuple[str, dict]] = []
    if not cfg.skip_vllm:
        port = free_port()
        env = {
            "VLLM_CPU_KVCACHE_SPACE": str(cfg.peer_kv_space_gib),
            "VLLM_CPU_OMP_THREADS_BIND": cores,
        }
        runs.append(("vllm", run_one(cfg, "vllm", vllm_server_command(cfg, port), env, port)))
    for mode in cfg.modes:
        port = free_port()
        name = f"brownout-jax-{mode.replace('=', '')}"
        runs.append((name, run_one(cfg, name, brownout_server_command(cfg, mode, port), {}, port)))
    return runs


def _ms(result: dict, key: str) -> str:
    value = result.get(key)
    return "—" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def format_table(runs: list[tuple[str, dict]], percentiles: str) -> str:
    top = percentiles.split(",")[-1]
    head = (
        f"| server | done / failed | req/s | output tok/s | goodput req/s | TTFT mean / P{top} "
        f"ms | TPOT mean / P{top} ms | E2EL mean / P{top} ms |"
    )
    lines = [head, "| " + " | ".join(["---"] * 8) + " |"]
    for name, r in runs:
        goodput = r.get("request_goodput")
        lines.append(
            f"| {name} | {r.get('completed')} / {r.get('failed', 0)} "
            f"| {r.get('request_throughput', 0):.2f} | {r.get('output_throughput', 0):.1f} "
            f"| {'—' if goodput is None else f'{goodput:.2f}'} "
            f"| {_ms(r, 'mean_ttft_ms')} / {_ms(r, f'p{top}_ttft_ms')} "
            f"| {_ms(r, 'mean_tpot_ms')} / {_ms(r, f'p{top}_tpot_ms')} "
            f"| {_ms(r, 'mean_e2el_ms')} / {_ms(r, f'p{top}_e2el_ms')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> CompareConfig:
    p = argparse.ArgumentParser(
        prog="python -m brownout_jax.eval.serve_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peer-python", required=True, help="interpreter of a venv with vllm-cpu")
    p.add_argument("--model", help="HF checkpoint directory with a tokenizer (default: the demo)")
    p.add_argument(
        "--united", help="brownout-jax's united experts (default with the demo: its own)"
    )
    p.add_argument("--modes", default="off,auto", help="brownout-jax --brownout values to run")
    p.add_argument("--out-dir", default="serve-compare", help="results, logs and table.md")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64, help="random prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens (EOS ignored)")
    p.add_argument("--request-rate", type=float, default=4.0)
    p.add_argument("--burstiness", type=float, default=0.5, help="gamma shape; < 1 is burstier")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:200"], help="KEY:ms")
    p.add_argument("--percentile-metrics", default="ttft,tpot,e2el")
    p.add_argument("--metric-percentiles", default="50,90,99")
    p.add_argument("--num-warmups", type=int, default=4)
    p.add_argument("--max-batch", type=int, default=16, help="both: running sequences")
    p.add_argument("--max-model-len", type=int, help="both (default: the model's positions)")
    p.add_argument("--ladder", help="brownout-jax --ladder (default: serve's)")
    p.add_argument("--peer-cores", default="", help="VLLM_CPU_OMP_THREADS_BIND (default: all)")
    p.add_argument("--peer-dtype", default="auto", help="vLLM --dtype (auto: the checkpoint's)")
    p.add_argument("--slo-ttft", type=float, help="brownout-jax controller (default: goodput)")
    p.add_argument("--slo-tpot", type=float, help="brownout-jax controller (default: goodput)")
    p.add_argument("--startup-timeout", type=float, default=1800.0)
    p.add_argument("--skip-vllm", action="store_true", help="only brownout-jax's runs")
    args = p.parse_args(argv)
    peer = Path(args.peer_python)
    if not peer.is_file() or not os.access(peer, os.X_OK):
        p.error(f"--peer-python: {peer} is not an executable file")
    model, united = args.model, args.united
    if model is None:
        from brownout_jax.checkpoints.demo_model import default_model

        model, united = default_model(None, united)
    return CompareConfig(
        peer_python=peer,
        model=model,
        united=united,
        modes=tuple(m for m in args.modes.split(",") if m),
        out_dir=Path(args.out_dir),
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        seed=args.seed,
        goodput=tuple(args.goodput),
        percentile_metrics=args.percentile_metrics,
        metric_percentiles=args.metric_percentiles,
        num_warmups=args.num_warmups,
        max_batch=args.max_batch,
        max_model_len=args.max_model_len,
        ladder=args.ladder,
        peer_cores=args.peer_cores,
        peer_dtype=args.peer_dtype,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        startup_timeout_s=args.startup_timeout,
        skip_vllm=args.skip_vllm,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        runs = run_compare(cfg)
    except KeyboardInterrupt:
        print("serve_compare: interrupted; the server was stopped", file=sys.stderr)
        return 130
    table = format_table(runs, cfg.metric_percentiles)
    (cfg.out_dir / "table.md").write_text(table + "\n")
    print(table)
    bad = [name for name, r in runs if r.get("server_exit_code") != 0]
    if bad:
        print(f"serve_compare: servers that did not exit 0: {', '.join(bad)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
