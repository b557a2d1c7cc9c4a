"""``brownout-jax bench moe-layer``: one MoE layer at Qwen1.5-MoE size, brownout on and off.

Random weights (bf16 by default, fp32 accumulation), a router with a fixed Zipf-like popularity
skew, way-4 contiguous united experts. For every (backend, batch, threshold): median latency,
distinct expert weights read, bytes read and achieved GB/s, and GFLOP/s of the real
assignments, beside the machine's own read bandwidth and dense matmul peak measured in the
same run. This is a benchmark, not a test: its figures go to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from brownout_jax.cpu_kernels.packing import pack, pack_stack
from brownout_jax.model.matmul_choice import median_ms
from brownout_jax.model.packed_params import packing_available
from brownout_jax.model.params import DenseMlpParams, ExpertWeights, MoeParams
from brownout_jax.moe.block import moe_block
from brownout_jax.moe.brownout import route_with_brownout
from brownout_jax.moe.expert_backend import ExpertBackend
from brownout_jax.moe.experts import resolve_backend
from brownout_jax.moe.options import MoeOptions
from brownout_jax.moe.routing import route_top_k


@dataclasses.dataclass(frozen=True, slots=True)
class MoeLayerShape:
    hidden: int = 2048
    experts: int = 60
    top_k: int = 4
    intermediate: int = 1408
    shared_intermediate: int = 5632


QWEN_MOE_LAYER = MoeLayerShape()


def zipf_router(
    shape: MoeLayerShape, skew: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Router weights plus a unit direction u: tokens carrying u get logit offsets
    ``skew · log(1 / rank)``, a fixed Zipf-like popularity over experts."""
    d, e = shape.hidden, shape.experts
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    popularity_rank = rng.permutation(e) + 1
    offsets = -skew * np.log(popularity_rank)
    router = rng.standard_normal((d, e)) / np.sqrt(d) + np.outer(u, offsets)
    return router.astype(np.float32), u.astype(np.float32)


def default_weight_dtype():
    """What ``--dtype auto`` serves with: bf16, except on a CPU without the compiled kernel,
    where the pure-JAX path runs bf16 slices in f32 and hoists the upcast of the *whole*
    stacked weight array out of its tile loop (a 1.3 GB pass per call at Qwen size)."""
    from brownout_jax.checkpoints.loader import resolve_dtype

    return resolve_dtype("auto")


def make_layer(shape: MoeLayerShape, way: int, skew: float, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    d, f, e = shape.hidden, shape.intermediate, shape.experts
    u = -(-e // way)
    key = jax.random.key(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)

    def normal(k, s, fan_in):
        return (jax.random.normal(k, s, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    experts = ExpertWeights(
        normal(k1, (e + u, d, f), d), normal(k2, (e + u, d, f), d), normal(k3, (e + u, f, d), f)
    )
    fs = shape.shared_intermediate
    s1, s2, s3, s4 = jax.random.split(k4, 4)
    router, direction = zipf_router(shape, skew, rng)
    params = MoeParams(
        router=jnp.asarray(router, dtype),
        experts=experts,
        shared=DenseMlpParams(
            normal(s1, (d, fs), d), normal(s2, (d, fs), d), normal(s3, (fs, d), fs)
        ),
        shared_gate=normal(s4, (d, 1), d),
        group_of_expert=jnp.asarray(np.arange(e) // way, jnp.int32),
    )
    return params, direction


def _packed_layer(params: MoeParams, experts: bool = True) -> MoeParams:
    """The layer as serving holds it: the shared expert and (``experts``) the expert stacks
    packed."""
    packed_experts = params.experts
    if experts:
        packed_experts = ExpertWeights(
            *(
                pack_stack(w)
                for w in (packed_experts.w_gate, packed_experts.w_up, packed_experts.w_down)
            )
        )
    shared = params.shared
    if shared is not None:
        shared = DenseMlpParams(*(pack(w) for w in (shared.w_gate, shared.w_up, shared.w_down)))
    return params.replace(experts=packed_experts, shared=shared)


def tokens_for(n: int, shape: MoeLayerShape, direction: np.ndarray, seed: int, dtype) -> jax.Array:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, shape.hidden)).astype(np.float32) + direction
    return jnp.asarray(x, dtype)


def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of a jitted full reduction over a large array: the machine's read bandwidth."""
    big = jnp.ones((nbytes // 4,), jnp.float32)
    return nbytes / median_ms(jax.jit(jnp.sum), (big,), repeats) / 1e6


def measure_matmul_peak(dtype, repeats: int = 5) -> float:
    """GFLOP/s of the best dense matmul this machine runs at a prefill-like shape (512 ×
    2048 · 2048 × 5632) in ``dtype``: XLA's dot (fp32 accumulation), or the model's
    ``dense.matmul_f32`` on the weight as serving holds it (packed for the CPU kernels when
    they are built and the weight is bf16)."""
    from brownout_jax.model.dense import matmul_f32

    x = jnp.ones((512, 2048), dtype)
    w = jnp.full((2048, 5632), 0.01, dtype)
    weights = [w]
    if packing_available() and jnp.dtype(dtype) == jnp.bfloat16:
        from brownout_jax.cpu_kernels import pack

        weights.append(pack(w))
    best = 0.0
    for fn, weight in [
        (lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), w),
        *((matmul_f32, weight) for weight in weights),
    ]:
        ms = median_ms(jax.jit(fn), (x, weight), repeats)
        best = max(best, 2 * 512 * 2048 * 5632 / ms / 1e6)
    return best


def layer_flops(shape: MoeLayerShape, tokens: int) -> int:
    """Multiply-adds × 2 of one layer: routed top-k FFNs, shared expert, router."""
    routed = tokens * shape.top_k * 3 * shape.hidden * shape.intermediate
    shared = tokens * 3 * shape.hidden * shape.shared_intermediate
    return 2 * (routed + shared + tokens * shape.hidden * shape.experts)


@functools.partial(jax.jit, static_argnames=("top_k", "options"))
def _layer(x, params, mask, *, top_k, options):
    return moe_block(x, params, mask, top_k, False, options).out


def _distinct_experts(x, params: MoeParams, top_k: int, threshold: float) -> tuple[int, float]:
    routing = route_top_k(x, params.router, top_k, False)
    ids = routing.expert_ids
    mask = jnp.ones(x.shape[0], bool)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=params.group_of_expert.shape[0])
    top6 = np.sort(counts)[::-1][:6].sum() / counts.sum()
    if threshold < 1.0:
        ids = route_with_brownout(ids, mask, params.group_of_expert, params.num_united, threshold)
    return len(np.unique(np.asarray(ids))), float(top6)


def run_moe_layer_bench(
    batches: tuple[int, ...] = (1, 8, 32, 64),
    prefill_tokens: int = 512,
    thresholds: tuple[float, ...] = (0.0, 0.5, 1.0),
    way: int = 4,
    skew: float = 1.0,
    repeats: int = 10,
    shape: MoeLayerShape = QWEN_MOE_LAYER,
    weight_dtype=None,
    backends: tuple[ExpertBackend, ...] = (ExpertBackend.AUTO,),
    layouts: tuple[str, ...] = ("packed", "stored"),
) -> dict:
    """``layouts``: for the CPU kernel backend, the weights as serving packs them
    (``packed``: expert stacks and shared expert in the packed layout) and/or the expert
    stacks as stored (``stored``: the grouped kernel on (E, D, F) stacks, as before packing;
    the shared expert packed in both, so the two differ by the expert kernel alone)."""
    dtype = jnp.dtype(weight_dtype or default_weight_dtype())
    stored, direction = make_layer(shape, way, skew, dtype)
    packed = None
    if dtype == jnp.bfloat16 and packing_available():
        packed = _packed_layer(stored)
        stored = _packed_layer(stored, experts=False)
    bandwidth = measure_read_bandwidth()
    matmul_peak = measure_matmul_peak(dtype)
    expert_bytes = 3 * shape.hidden * shape.intermediate * dtype.itemsize
    fixed_bytes = (
        3 * shape.hidden * shape.shared_intermediate + shape.hidden * shape.experts
    ) * dtype.itemsize
    rows = []
    cases = [("decode", b) for b in batches] + (
        [("prefill", prefill_tokens)] if prefill_tokens else []
    )
    variants = []
    for backend in backends:
        if resolve_backend(backend) is ExpertBackend.CPU_KERNEL and packed and "packed" in layouts:
            variants.append((backend, "packed", packed))
        if resolve_backend(backend) is not ExpertBackend.CPU_KERNEL or "stored" in layouts:
            variants.append((backend, "stored", stored))
    for (backend, layout, params), (phase, n) in itertools.product(variants, cases):
        x = tokens_for(n, shape, direction, seed=n, dtype=dtype)
        mask = jnp.ones(n, bool)
        for threshold in thresholds:
            options = MoeOptions(threshold=threshold, backend=backend)
            run = functools.partial(_layer, top_k=shape.top_k, options=options)
            run(x, params, mask).block_until_ready()  # compile + warm
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run(x, params, mask).block_until_ready()
                times.append(time.perf_counter() - start)
            distinct, top6 = _distinct_experts(x, stored, shape.top_k, threshold)
            latency = statistics.median(times)
            nbytes = distinct * expert_bytes + fixed_bytes
            rows.append(
                {
                    "backend": resolve_backend(backend).value
                    + ("_packed" if layout == "packed" else ""),
                    "phase": phase,
                    "tokens": n,
                    "threshold": threshold,
                    "median_ms": round(latency * 1e3, 3),
                    "distinct_experts": distinct,
                    "bytes_read_mb": round(nbytes / 1e6, 1),
                    "achieved_gb_s": round(nbytes / latency / 1e9, 2),
                    "gflop_s": round(layer_flops(shape, n) / latency / 1e9, 1),
                    "top6_share": round(top6, 3),
                }
            )
    summary = {}
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["backend"] == backend]
        by_key = {(r["phase"], r["tokens"], r["threshold"]): r for r in mine}
        part = {}
        if ("decode", 32, 0.0) in by_key and ("decode", 32, 1.0) in by_key:
            one = by_key[("decode", 32, 1.0)]
            part["decode32_t0_over_t1"] = round(
                by_key[("decode", 32, 0.0)]["median_ms"] / one["median_ms"], 3
            )
            part["decode32_t1_fraction_of_bandwidth"] = round(one["achieved_gb_s"] / bandwidth, 3)
        prefill = [r for r in mine if r["phase"] == "prefill" and r["threshold"] == 1.0]
        if prefill:
            part["prefill_t1_fraction_of_matmul_peak"] = round(
                prefill[0]["gflop_s"] / matmul_peak, 3
            )
        summary[backend] = part
    return {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "layer": dataclasses.asdict(shape),
        "way": way,
        "weight_dtype": dtype.name,
        "zipf_skew": skew,
        "read_bandwidth_gb_s": round(bandwidth, 2),
        "matmul_peak_gflop_s": round(matmul_peak, 1),
        "rows": rows,
        "summary": summary,
    }


def format_table(result: dict) -> str:
    lines = [
        f"device {result['device']} ({result['backend']}), read bandwidth "
        f"{result['read_bandwidth_gb_s']} GB/s, matmul peak {result['matmul_peak_gflop_s']} "
        f"GFLOP/s, way {result['way']}, weights {result['weight_dtype']}, zipf skew "
        f"{result['zipf_skew']}",
        "| experts backend | phase | tokens | threshold | median ms | distinct experts | MB read "
        "| GB/s | GFLOP/s | top-6 share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = (
        "backend",
        "phase",
        "tokens",
        "threshold",
        "median_ms",
        "distinct_experts",
        "bytes_read_mb",
        "achieved_gb_s",
        "gflop_s",
        "top6_share",
    )
    for r in result["rows"]:
        lines.append("| " + " | ".join(str(r[k]) for k in keys) + " |")
    lines.append(f"summary: {result['summary']}")
    return "\n".join(lines)
