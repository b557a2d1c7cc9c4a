"""``brownout-jax bench burst``: N requests at once through the engine; TTFT, TPOT, throughput.

Reports the scheduling policy's behaviour under a burst (docs/BENCHMARKS.md). Prompts are
synthetic token ids of random lengths, or Alpaca/ShareGPT prompts when a file is given.
"""

from __future__ import annotations

import time

import numpy as np

from brownout_jax.engine.front import Engine
from brownout_jax.engine.requests import GenerationRequest


def _summary(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None}
    arr = np.asarray(values)
    return {
        "mean": round(float(arr.mean()), 4),
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p90": round(float(np.percentile(arr, 90)), 4),
    }


def run_burst(
    engine: Engine,
    num_requests: int,
    prompt_lengths: tuple[int, int],
    max_new_tokens: int,
    seed: int = 0,
    prompts: list[list[int]] | None = None,
) -> dict:
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    if prompts is None:
        prompts = [
            rng.integers(0, vocab, int(rng.integers(*prompt_lengths))).tolist()
            for _ in range(num_requests)
        ]
    start = time.perf_counter()
    handles = [
        engine.submit(
            GenerationRequest(
                prompt_token_ids=tuple(p),
                max_new_tokens=max_new_tokens,
                ignore_eos=True,
                detokenize=False,  # token counts and timings only: no host time on text
            )
        )
        for p in prompts[:num_requests]
    ]
    outputs = [h.result() for h in handles]
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    stats = engine.stats()
    return {
        "requests": len(outputs),
        "max_new_tokens": max_new_tokens,
        "elapsed_s": round(elapsed, 3),
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "requests_per_s": round(len(outputs) / elapsed, 3),
        "ttft_s": _summary([o.metrics.ttft for o in outputs]),
        "tpot_s": _summary([o.metrics.tpot_mean for o in outputs if o.metrics.tpot_mean]),
        "queue_s": _summary([o.metrics.queue_time for o in outputs]),
        "preemptions": stats.preemptions,
        "steps": stats.steps,
        "thresholds_final": [stats.prefill_threshold, stats.decode_threshold],
        "compile_s": round(engine.compile_seconds, 2),
        "compiled_steps": engine.compiled_steps,
    }
