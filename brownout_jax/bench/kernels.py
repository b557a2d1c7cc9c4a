"""``brownout-jax bench kernels``: the grouped-matmul kernels against ``jax.lax.ragged_dot`` and a
dense per-expert loop, at Qwen1.5-MoE size (k 2048, n 1408, 60 routed + 15 united experts).

For every rows count m and group distribution (Zipf-skewed over the groups, or spread so that
all groups are touched), each implementation's median latency, its effective GB/s (weights of
the touched groups + activations in and out, divided by the time) as a fraction of the
device's measured copy bandwidth, and its useful TFLOP/s (2·m·k·n per projection) as a
fraction of a measured dense bf16 matmul. This is a benchmark, not a test.

On a non-GPU backend the kernels can only run in Pallas interpret mode, so the benchmark
shrinks itself to a smoke test (tiny shapes, few rows) and says so in its output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.model.matmul_choice import median_ms
from pallas_kernels.api import grouped_matmul, moe_down, moe_gate_up


@dataclasses.dataclass(frozen=True, slots=True)
class KernelBenchShape:
    k: int = 2048  # hidden size
    n: int = 1408  # expert intermediate size (= 11 · 128)
    experts: int = 60
    united: int = 15

    @property
    def groups(self) -> int:
        return self.experts + self.united


QWEN_SHAPE = KernelBenchShape()
SMOKE_SHAPE = KernelBenchShape(k=64, n=32, experts=6, united=2)
DEFAULT_ROWS = (1, 4, 16, 64, 256, 4096)
SMOKE_ROWS = (1, 4, 16, 64)


def group_sizes_for(m: int, groups: int, dist: str, skew: float, rng) -> np.ndarray:
    """Rows per group: "zipf" draws each row's group from p ∝ 1 / rank^skew; "all" spreads the
    rows round-robin, so min(m, groups) groups are touched."""
    if dist == "zipf":
        p = 1.0 / np.arange(1, groups + 1) ** skew
        picks = rng.choice(groups, size=m, p=p / p.sum())
        return np.bincount(rng.permutation(groups)[picks], minlength=groups).astype(np.int32)
    if dist == "all":
        return np.bincount(np.arange(m) % groups, minlength=groups).astype(np.int32)
    raise ValueError(f"unknown group distribution {dist!r}")


def _median_seconds(fn, args, repeats: int) -> float:
    return median_ms(fn, args, repeats) / 1e3


def measure_copy_gbps(nbytes: int, repeats: int) -> float:
    """Device-to-device streaming bandwidth: read + write of one array."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    seconds = _median_seconds(jax.jit(lambda a: a + 1), (a,), repeats)
    return 2 * a.nbytes / seconds / 1e9


def measure_matmul_tflops(size: int, dtype, repeats: int) -> float:
    a = jnp.ones((size, size), dtype)
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype))
    seconds = _median_seconds(fn, (a, a), repeats)
    return 2 * size**3 / seconds / 1e12


def _dense_loop(x, w, group_sizes):
    """Every group's full matmul, masked to its rows: g × the dense cost."""
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(x.shape[0]), side="right")

    def one(acc, inputs):
        i, wi = inputs
        y = jnp.dot(x, wi, preferred_element_type=jnp.float32)
        return acc + jnp.where((row_group == i)[:, None], y, 0.0), None

    zeros = jnp.zeros((x.shape[0], w.shape[2]), jnp.float32)
    out, _ = jax.lax.scan(one, zeros, (jnp.arange(w.shape[0]), w))
    return out.astype(x.dtype)


def _implementations(interpret: bool):
    """name → (function of (x, w_gate, w_up, w_down, h, gs, rw), projections, uses h/down)."""
    return {
        "grouped_matmul": (
            jax.jit(
                lambda x, wg, wu, wd, h, gs, rw: grouped_matmul(x, wg, gs, interpret=interpret)
            ),
            1,
            False,
        ),
        "moe_gate_up": (
            jax.jit(
                lambda x, wg, wu, wd, h, gs, rw: moe_gate_up(x, wg, wu, gs, interpret=interpret)
            ),
            2,
            False,
        ),
        "moe_down": (
            jax.jit(lambda x, wg, wu, wd, h, gs, rw: moe_down(h, wd, gs, rw, interpret=interpret)),
            1,
            True,
        ),
        "ragged_dot": (
            jax.jit(lambda x, wg, wu, wd, h, gs, rw: jax.lax.ragged_dot(x, wg, gs)),
            1,
            False,
        ),
        "dense": (jax.jit(lambda x, wg, wu, wd, h, gs, rw: _dense_loop(x, wg, gs)), 1, False),
    }


def run_kernel_bench(
    *,
    small: bool | None = None,
    rows: tuple[int, ...] | None = None,
    repeats: int = 10,
    skew: float = 1.0,
    seed: int = 0,
) -> dict:
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu
    small = (not on_gpu) if small is None else small
    shape = SMOKE_SHAPE if small else QWEN_SHAPE
    rows = rows or (SMOKE_ROWS if small else DEFAULT_ROWS)
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    itemsize = jnp.dtype(dtype).itemsize
    k, n, g = shape.k, shape.n, shape.groups
    keys = jax.random.split(jax.random.key(seed), 5)
    w_gate = (jax.random.normal(keys[0], (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    w_up = (jax.random.normal(keys[1], (g, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    w_down = (jax.random.normal(keys[2], (g, n, k), jnp.float32) / np.sqrt(n)).astype(dtype)
    copy_gbps = measure_copy_gbps((256 if on_gpu and not small else 16) << 20, repeats)
    peak_tflops = measure_matmul_tflops(4096 if on_gpu and not small else 256, dtype, repeats)
    rng = np.random.default_rng(seed)
    results = []
    for m in rows:
        x = jax.random.normal(keys[3], (m, k), jnp.float32).astype(dtype)
        h = jax.random.normal(keys[4], (m, n), jnp.float32).astype(dtype)
        rw = jnp.full((m,), 0.5, dtype)
        for dist in ("zipf", "all"):
            sizes = group_sizes_for(m, g, dist, skew, rng)
            touched = int(np.count_nonzero(sizes))
            gs = jnp.asarray(sizes)
            for name, (fn, projections, down) in _implementations(interpret).items():
                seconds = _median_seconds(fn, (x, w_gate, w_up, w_down, h, gs, rw), repeats)
                weight_bytes = projections * touched * k * n * itemsize
                act_bytes = m * (k + n) * itemsize + (m * itemsize if down else 0)
                flops = 2 * projections * m * k * n
                gbps = (weight_bytes + act_bytes) / seconds / 1e9
                tflops = flops / seconds / 1e12
                results.append(
                    dict(
                        impl=name,
                        dist=dist,
                        m=m,
                        groups_touched=touched,
                        seconds=seconds,
                        gbps=gbps,
                        copy_fraction=gbps / copy_gbps,
                        tflops=tflops,
                        matmul_fraction=tflops / peak_tflops,
                    )
                )
    note = (
        "non-GPU backend: kernels in Pallas interpret mode at smoke-test sizes; "
        "the figures measure the interpreter, not the kernels"
        if interpret
        else ("GPU, shrunk shapes (--small)" if small else "GPU, Qwen1.5-MoE expert shapes")
    )
    return dict(
        device=str(jax.devices()[0].device_kind),
        backend=jax.default_backend(),
        interpret=interpret,
        small=small,
        note=note,
        dtype=jnp.dtype(dtype).name,
        shape=dataclasses.asdict(shape),
        copy_gbps=copy_gbps,
        matmul_tflops=peak_tflops,
        results=results,
    )


def format_table(result: dict) -> str:
    lines = [
        f"device {result['device']} ({result['backend']}), {result['dtype']}; {result['note']}",
        f"shape {result['shape']}; copy {result['copy_gbps']:.1f} GB/s, "
        f"matmul {result['matmul_tflops']:.2f} TFLOP/s",
        f"{'impl':>15} {'dist':>5} {'m':>5} {'touched':>7} {'µs':>10} {'GB/s':>9} "
        f"{'%copy':>6} {'TFLOP/s':>8} {'%mm':>6}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['impl']:>15} {r['dist']:>5} {r['m']:5d} {r['groups_touched']:7d} "
            f"{r['seconds'] * 1e6:10.1f} {r['gbps']:9.2f} {100 * r['copy_fraction']:6.1f} "
            f"{r['tflops']:8.3f} {100 * r['matmul_fraction']:6.1f}"
        )
    return "\n".join(lines)
