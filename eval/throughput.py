"""``brownout-jax eval throughput``: the engine and a peer on the same prompts, same run."""

from __future__ import annotations

import time

import numpy as np

from brownout_jax.bench_burst import run_burst
from brownout_jax.controller import ControllerConfig, SloController


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
        "batch_size": batch_size,
    }


def run_throughput(
    engine,
    model_dir,
    num_prompts: int,
    prompt_len: tuple[int, int],
    max_new_tokens: int,
    thresholds: tuple[float, ...],
    peer: bool,
    peer_batch: int,
    seed: int = 0,
) -> dict:
    rng = np.random.default_rng(seed)
    vocab_size = engine.model_config.vocab_size
    prompts = [
        rng.integers(0, vocab_size, int(rng.integers(*prompt_len))).tolist()
        for _ in range(num_prompts)
    ]
    rows = []
    for threshold in thresholds:
        # The engine is idle between runs and every level is compiled: the controller picks one.
        engine.controller = SloController(
            ControllerConfig(mode="fixed", fixed_threshold=threshold), engine.ladder, engine.clock
        )
        run_burst(engine, min(4, num_prompts), prompt_len, 2, prompts=prompts)  # warm caches
        result = run_burst(engine, num_prompts, prompt_len, max_new_tokens, prompts=prompts)
        rows.append({"threshold": threshold, **result})
    report = {"prompts": num_prompts, "max_new_tokens": max_new_tokens, "engine": rows}
    try:
        import vllm  # noqa: F401

        report["vllm"] = "installed, but the vLLM peer is not wired yet"
    except ImportError:
        report["vllm"] = "not available (not installed)"
    if peer:
        report["transformers"] = transformers_peer(model_dir, prompts, max_new_tokens, peer_batch)
        base = report["transformers"]["output_tokens_per_s"]
        report["speedup_vs_transformers"] = {
            str(r["threshold"]): round(r["output_tokens_per_s"] / base, 2) for r in rows
        }
    return report
