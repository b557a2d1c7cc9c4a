"""``brownout-jax bench long-prompt``: one long prompt arriving while short requests decode,
through the engine ``serve`` runs — its TTFT, the decoders' TPOT before and while it is
prefilled (in chunks), the process's resident memory over the idle engine and over its KV
pool, and a request served afterwards. A benchmark, not a test.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time

import numpy as np

from brownout_jax.engine.requests import GenerationRequest


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class _RssSampler:
    """The highest resident set seen, sampled every 20 ms on a thread."""

    def __init__(self):
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _gaps(times: list[float], start: float, end: float) -> list[float]:
    inside = [t for t in times if start <= t <= end]
    return [b - a for a, b in itertools.pairwise(inside)]


def run_long_prompt(engine, prompt_len: int, decoders: int, seed: int = 0) -> dict:
    """``decoders`` requests with 16-token prompts decode; once each has 8 tokens (idle
    TPOT), a ``prompt_len``-token prompt arrives; the decoders keep going until it has its
    first token (TPOT meanwhile)."""
    from brownout_jax.engine.paged_cache import kv_pool_bytes

    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(seed)
    short = [rng.integers(0, vocab, 16).tolist() for _ in range(decoders)]
    long = rng.integers(0, vocab, prompt_len).tolist()
    budget = engine.max_model_len - 16
    # Warm-up: every step shape the run takes runs once (a short and a long prompt).
    engine.submit(GenerationRequest(prompt_token_ids=tuple(short[0]), max_new_tokens=4)).result()
    warm = GenerationRequest(prompt_token_ids=tuple(long), max_new_tokens=2, ignore_eos=True)
    engine.submit(warm).result()
    idle_rss = _rss_bytes()
    with _RssSampler() as rss:
        handles = [
            engine.submit(
                GenerationRequest(prompt_token_ids=tuple(p), max_new_tokens=budget, ignore_eos=True)
            )
            for p in short
        ]
        while min(len(h.metrics.token_times) for h in handles) < 8:
            time.sleep(0.005)
        arrival = time.monotonic()
        big = engine.submit(
            GenerationRequest(prompt_token_ids=tuple(long), max_new_tokens=4, ignore_eos=True)
        )
        while big.metrics.first_token is None:
            time.sleep(0.005)
        first = time.monotonic()
        for handle in handles:
            handle.cancel()
        out = big.result()
    idle = [g for h in handles for g in _gaps(h.metrics.token_times, 0.0, arrival)]
    during = [g for h in handles for g in _gaps(h.metrics.token_times, arrival, first)]
    after = engine.submit(GenerationRequest(prompt_token_ids=tuple(short[0]), max_new_tokens=4))
    served_after = len(after.result().token_ids) == 4
    config = engine.config
    kv = kv_pool_bytes(engine.model_config, config.num_blocks, config.block_size, "bfloat16")
    idle_tpot = statistics.median(idle)

    def ms(value):
        return None if value is None else round(value * 1e3, 2)

    during_tpot = statistics.median(during) if during else None
    during_p90 = float(np.percentile(during, 90)) if during else None
    return {
        "prompt_tokens": prompt_len,
        "decoders": decoders,
        "prefill_chunk": config.prefill_chunk if config.chunked_prefill else None,
        "attention": config.attention.value,
        "ttft_s": round(first - arrival, 3),
        "long_prompt_tokens_out": len(out.token_ids),
        "decoders_tpot_idle_ms": ms(idle_tpot),
        "decoders_tpot_during_prefill_ms": ms(during_tpot),
        "decoders_tpot_during_p90_ms": ms(during_p90),
        "tpot_ratio_during_vs_idle": during_tpot and round(during_tpot / idle_tpot, 2),
        "idle_rss_gb": round(idle_rss / 1e9, 3),
        "peak_rss_gb": round(rss.peak / 1e9, 3),
        "peak_rise_over_idle_gb": round((rss.peak - idle_rss) / 1e9, 3),
        "kv_pool_gb": round(kv / 1e9, 3),
        "served_after": served_after,
    }
