"""``brownout-jax bench linear``: the model's dense matmuls, the packed CPU kernel against
XLA's dot, side by side in one run — median ms, GB/s of weights read, GFLOP/s, and their
shares of the machine's read bandwidth and dense matmul peak (both measured in the same run),
with the ISA copy the kernel ran and the path the engine's measured choice takes. A
benchmark, not a test.

Shapes default to Qwen1.5-MoE-A2.7B's: attention projections (2048 × 2048), the shared
expert (2048 × 5632, 5632 × 2048) and the LM head (2048 × 151936).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brownout_jax.bench.moe_layer import measure_matmul_peak, measure_read_bandwidth
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.matmul_choice import median_ms
from brownout_jax.model.packed_params import dense_weight_shapes, packing_available
from brownout_jax.model.params import abstract_params

DEFAULT_ROWS = (1, 8, 16, 32, 64, 512)


def model_dense_shapes(config: ModelConfig) -> tuple[tuple[int, int], ...]:
    return dense_weight_shapes(abstract_params(config, jnp.bfloat16))


def _row(m, k, n, path, isa, ms, bandwidth, peak) -> dict:
    gb_s = k * n * 2 / ms / 1e6
    gflop_s = 2 * m * k * n / ms / 1e6
    return {
        "m": m,
        "k": k,
        "n": n,
        "path": path,
        "isa": isa,
        "median_ms": round(ms, 4),
        "gb_s": round(gb_s, 2),
        "gflop_s": round(gflop_s, 1),
        "fraction_of_read_bandwidth": round(gb_s / bandwidth, 3),
        "fraction_of_matmul_peak": round(gflop_s / peak, 3),
    }


def run_linear_bench(shapes, rows=DEFAULT_ROWS, repeats: int = 10) -> dict:
    from brownout_jax.cpu_kernels import Isa, load_library, pack, packed_linear
    from brownout_jax.model.matmul_choice import dense_choice

    if not packing_available():
        raise RuntimeError("bench linear needs a CPU backend and the C++ kernel library")
    library = load_library()
    bandwidth = measure_read_bandwidth()
    peak = measure_matmul_peak(jnp.bfloat16)
    kernel = jax.jit(lambda x, w: packed_linear(x, w))
    xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
    choice = dense_choice(tuple(shapes))
    results = []
    for k, n in shapes:
        w = jnp.full((k, n), 0.01, jnp.bfloat16)
        packed = pack(w)
        chosen = choice.of((k, n))
        for m in rows:
            x = jnp.full((m, k), 0.5, jnp.bfloat16)
            isa = library.packed_isa_name(Isa.AUTO, True, m)
            results.append(
                _row(
                    m, k, n, "kernel", isa, median_ms(kernel, (x, packed), repeats), bandwidth, peak
                )
            )
            results.append(
                _row(m, k, n, "xla", "xla", median_ms(xla, (x, w), repeats), bandwidth, peak)
            )
            engine = packed.with_paths(chosen.paths).path_for(m).value if chosen.packed else "xla"
            results[-2]["engine_choice"] = results[-1]["engine_choice"] = engine
        del w, packed
    return {
        "device": str(jax.devices()[0].device_kind),
        "read_bandwidth_gb_s": round(bandwidth, 2),
        "matmul_peak_gflop_s": round(peak, 1),
        "kernel_isa_decode": library.packed_isa_name(Isa.AUTO, True, 1),
        "kernel_isa_prefill": library.packed_isa_name(Isa.AUTO, True, max(rows)),
        "rows": results,
    }


def format_table(result: dict) -> str:
    lines = [
        f"read bandwidth {result['read_bandwidth_gb_s']} GB/s, matmul peak "
        f"{result['matmul_peak_gflop_s']} GFLOP/s; kernel ISA: decode "
        f"{result['kernel_isa_decode']}, prefill {result['kernel_isa_prefill']}",
        "| k × n | m | kernel ms | xla ms | kernel GB/s (share) | kernel GFLOP/s (share) | "
        "engine takes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = result["rows"]
    for kernel, xla in zip(rows[::2], rows[1::2], strict=True):
        lines.append(
            f"| {kernel['k']} × {kernel['n']} | {kernel['m']} | {kernel['median_ms']} | "
            f"{xla['median_ms']} | {kernel['gb_s']} ({kernel['fraction_of_read_bandwidth']}) | "
            f"{kernel['gflop_s']} ({kernel['fraction_of_matmul_peak']}) | "
            f"{kernel['engine_choice']} |"
        )
    return "\n".join(lines)
