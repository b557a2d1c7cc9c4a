"""``brownout-jax bench attention``: one layer's decode attention over the paged KV pool at a
model's head dims, the paged-attention kernel against XLA's gathered window, at several
context lengths — median ms, ms per 1k tokens attended, GB/s of keys and values read and its
share of the read bandwidth measured in the same run — plus one prefill chunk at the end of
each context (ms, GFLOP/s). A benchmark, not a test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.bench.moe_layer import measure_read_bandwidth
from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.paged_cache import PagedKVCache
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.matmul_choice import median_ms

BLOCK = 16


def _pool(rng, config: ModelConfig, blocks: int):
    from brownout_jax.engine.paged_cache import KVPool

    shape = (blocks, BLOCK, config.num_kv_heads, config.head_dim)
    one_layer = config.replace(num_layers=1)
    pool = KVPool.allocate(one_layer, 1, BLOCK, jnp.bfloat16)

    def bits():
        values = jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
        return jax.lax.bitcast_convert_type(values, jnp.uint16)

    return pool.replace(keys=(bits(),), values=(bits(),))


def _attend_fn(path: AttentionPath):
    def attend(pool, tables, q, positions, mask):
        cache = PagedKVCache(pool=pool, block_tables=tables, attention=path)
        return cache.attend(0, q, positions, mask)

    return jax.jit(attend)


def run_attention_bench(
    config: ModelConfig,
    batch: int = 8,
    contexts: tuple[int, ...] = (1024, 4096, 8192),
    chunk: int = 512,
    repeats: int = 10,
    xla: bool = True,
) -> dict:
    from brownout_jax.cpu_kernels import Isa, load_library

    rng = np.random.default_rng(0)
    bandwidth = measure_read_bandwidth()
    h, g, c = config.num_heads, config.num_kv_heads, config.head_dim
    paths = [AttentionPath.KERNEL] + ([AttentionPath.XLA] if xla else [])
    fns = {path: _attend_fn(path) for path in paths}
    rows = []
    for context in contexts:
        width = -(-context // BLOCK)
        pool = _pool(rng, config, 1 + batch * width)
        tables = jnp.asarray(1 + np.arange(batch * width).reshape(batch, width), jnp.int32)
        q = jnp.asarray(rng.standard_normal((batch, 1, h, c), np.float32), jnp.bfloat16)
        positions = jnp.full((batch, 1), context - 1, jnp.int32)
        mask = jnp.ones((batch, 1), bool)
        kv_bytes = 2 * batch * context * g * c * 2
        for path in paths:
            ms = median_ms(fns[path], (pool, tables, q, positions, mask), repeats)
            gb_s = kv_bytes / ms / 1e6
            rows.append(
                {
                    "phase": "decode",
                    "path": path.value,
                    "batch": batch,
                    "context": context,
                    "median_ms": round(ms, 3),
                    "ms_per_1k_tokens": round(ms / (batch * context / 1000), 4),
                    "kv_gb_s": round(gb_s, 1),
                    "fraction_of_read_bandwidth": round(gb_s / bandwidth, 3),
                }
            )
        # One prefill chunk of one row at the end of this context (the kernel only: XLA's
        # path gathers a window per chunk, which the engine does not do).
        t = min(chunk, context)
        cq = jnp.asarray(rng.standard_normal((1, t, h, c), np.float32), jnp.bfloat16)
        cpos = jnp.asarray(context - t + np.arange(t)[None], jnp.int32)
        ms = median_ms(
            fns[AttentionPath.KERNEL],
            (pool, tables[:1], cq, cpos, jnp.ones((1, t), bool)),
            max(1, repeats // 2),
        )
        attended = t * (context - t) + t * (t + 1) / 2  # query · key pairs
        rows.append(
            {
                "phase": "prefill chunk",
                "path": AttentionPath.KERNEL.value,
                "batch": 1,
                "context": context,
                "chunk": t,
                "median_ms": round(ms, 3),
                "gflop_s": round(4 * attended * h * c / ms / 1e6, 1),
            }
        )
    library = load_library()
    return {
        "heads": h,
        "kv_heads": g,
        "head_dim": c,
        "kernel_isa": library.attention_isa_name(Isa.AUTO, c),
        "read_bandwidth_gb_s": round(bandwidth, 1),
        "cores": _cores(),
        "rows": rows,
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def format_table(result: dict) -> str:
    lines = [
        f"heads {result['heads']} (KV {result['kv_heads']}) × {result['head_dim']}, kernel ISA "
        f"{result['kernel_isa']}, read bandwidth {result['read_bandwidth_gb_s']} GB/s, "
        f"{result['cores']} cores",
        "| phase | path | batch | context | ms | ms per 1k tokens | KV GB/s (share) | GFLOP/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        share = (
            f"{row['kv_gb_s']} ({row['fraction_of_read_bandwidth']})" if "kv_gb_s" in row else ""
        )
        lines.append(
            f"| {row['phase']} | {row['path']} | {row['batch']} | {row['context']} | "
            f"{row['median_ms']} | {row.get('ms_per_1k_tokens', '')} | {share} | "
            f"{row.get('gflop_s', '')} |"
        )
    return "\n".join(lines)
