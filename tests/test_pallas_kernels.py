"""Pallas grouped-matmul kernels: interpret mode against the per-group references, the tile
metadata, the Triton lowering (exported for CUDA from this machine), and the MoE block's
``pallas_interpret`` backend against the default CPU path."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_model_config
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout_jax.moe.grouped_experts import apply_experts_pallas
from pallas_kernels import (
    DECODE,
    PREFILL,
    KernelTiling,
    fit_tiling,
    group_metadata,
    grouped_matmul,
    grouped_matmul_reference,
    max_tiles,
    moe_down,
    moe_down_reference,
    moe_gate_up,
    moe_gate_up_reference,
    tiling_for_rows,
)
from pallas_kernels.tiling import fit_stages

SMALL = KernelTiling(bm=8, bn=16, bk=16)  # interpret mode only (Triton's dot needs ≥ 16)
K, N = 32, 32
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
_seeds = itertools.count()


def _inputs(m: int, g: int, dtype, seed: int | None = None):
    seed = next(_seeds) if seed is None else seed
    kx, kg, ku, kr = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (m, K), jnp.float32).astype(dtype)
    w_gate = (jax.random.normal(kg, (g, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    w_up = (jax.random.normal(ku, (g, K, N), jnp.float32) / np.sqrt(K)).astype(dtype)
    row_weights = jax.random.uniform(kr, (m,), jnp.float32, 0.1, 1.0).astype(dtype)
    return x, w_gate, w_up, row_weights


def _run_kernel(kind: str, sizes, dtype, m: int, tiling=SMALL):
    """(kernel output, reference output) of one kernel on fresh random inputs."""
    g = len(sizes)
    x, w_gate, w_up, row_weights = _inputs(m, g, dtype)
    gs = jnp.asarray(sizes, jnp.int32)
    if kind == "matmul":
        out = grouped_matmul(x, w_gate, gs, tiling=tiling, interpret=True)
        ref = jax.jit(grouped_matmul_reference)(x, w_gate, gs)
    elif kind == "gate_up":
        out = moe_gate_up(x, w_gate, w_up, gs, tiling=tiling, interpret=True)
        ref = jax.jit(moe_gate_up_reference)(x, w_gate, w_up, gs)
    else:
        out = moe_down(x, w_gate, gs, row_weights, tiling=tiling, interpret=True)
        ref = jax.jit(moe_down_reference)(x, w_gate, gs, row_weights)
    assert out.shape == (m, N) and out.dtype == x.dtype
    return np.asarray(out.astype(jnp.float32)), np.asarray(ref.astype(jnp.float32))


def _check(out, ref, sizes, dtype):
    assert np.all(np.isfinite(out)), "kernel output has NaN/inf"
    total = int(np.sum(sizes))
    assert np.all(out[total:] == 0), "rows past sum(group_sizes) must be zero"
    if total:
        assert rel_err(out, ref) <= TOLERANCE[dtype]
    else:
        assert np.all(out == 0)


# m = 40, 5 groups, bm = 8: one compile per (kernel, dtype) for all of these.
GROUP_CASES = {
    "empty_start": [0, 0, 13, 9, 11],
    "empty_middle": [7, 0, 0, 12, 9],
    "empty_end": [10, 15, 9, 0, 0],
    "one_group": [0, 0, 37, 0, 0],
    "one_row_each": [1, 1, 1, 1, 1],
    "rows_past_sum": [3, 4, 0, 2, 5],
    "whole_tiles": [8, 16, 0, 8, 8],
    "all_empty": [0, 0, 0, 0, 0],
}
KINDS = ("matmul", "gate_up", "down")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_kernels_match_reference(case, kind, dtype):
    sizes = GROUP_CASES[case]
    out, ref = _run_kernel(kind, sizes, dtype, m=40)
    _check(out, ref, sizes, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_rows_than_a_tile(kind):
    sizes = [2, 0, 3]  # m = 6 < bm = 8, one row past the sum
    out, ref = _run_kernel(kind, sizes, jnp.float32, m=6)
    _check(out, ref, sizes, jnp.float32)


def test_nan_in_output_is_caught():
    x, w, _, _ = _inputs(40, 5, jnp.float32)
    out = grouped_matmul(
        x.at[3, 0].set(jnp.nan), w, jnp.asarray([8, 8, 8, 8, 8]), tiling=SMALL, interpret=True
    )
    with pytest.raises(AssertionError, match="NaN"):
        rel_err(out, grouped_matmul_reference(x, w, jnp.asarray([8, 8, 8, 8, 8])))


@settings(max_examples=12, deadline=None)
@given(sizes=st.lists(st.integers(0, 8), min_size=6, max_size=6), kind=st.sampled_from(KINDS))
def test_random_group_sizes(sizes, kind):
    out, ref = _run_kernel(kind, sizes, jnp.float32, m=48)  # Σ sizes ≤ 48
    _check(out, ref, sizes, jnp.float32)


@pytest.mark.parametrize("case", ["empty_middle", "one_row_each", "rows_past_sum"])
def test_result_does_not_depend_on_program_order(case):
    """GPU programs run in any order; interpret mode runs them in grid order. Numbering the
    live tiles last group first must not change the result: a tile that stored rows outside
    its group (an unmasked store) would now overwrite rows of the group before it."""
    from pallas_kernels.grouped_matmul import grouped_call, row_scale_epilogue

    sizes = GROUP_CASES[case]
    x, w, _, row_weights = _inputs(40, 5, jnp.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    meta = group_metadata(gs, 40, SMALL.bm)
    t = jnp.arange(meta.tile_group.shape[0])
    live = meta.num_tiles[0]
    reverse = jnp.where(t < live, live - 1 - t, t)
    meta = dataclasses.replace(
        meta, tile_group=meta.tile_group[reverse], tile_first_row=meta.tile_first_row[reverse]
    )
    out = grouped_call(
        x,
        (w,),
        meta,
        tiling=SMALL,
        epilogue=row_scale_epilogue,
        out_dtype=x.dtype,
        row_weights=row_weights,
        interpret=True,
    )
    _check(
        np.asarray(out), np.asarray(moe_down_reference(x, w, gs, row_weights)), sizes, jnp.float32
    )


def test_moe_down_without_row_weights_and_fp32_output():
    x, w, _, _ = _inputs(40, 5, jnp.bfloat16)
    gs = jnp.asarray([5, 0, 20, 10, 0], jnp.int32)
    out = moe_down(x, w, gs, tiling=SMALL, interpret=True, out_dtype=jnp.float32)
    assert out.dtype == jnp.float32
    ref = grouped_matmul_reference(x, w, gs, out_dtype=jnp.float32)
    assert rel_err(out, ref) <= 1e-5  # bf16 products are exact in fp32; only the sum order


# ----------------------------------------------------------------------------- metadata


_metadata = jax.jit(group_metadata, static_argnums=(1, 2))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), min_size=8, max_size=8),
    bm=st.sampled_from([1, 4, 8, 16]),
)
def test_metadata_tiles_cover_each_group(sizes, bm):
    m = 170  # ≥ Σ sizes: fixed shapes, one compile per bm
    meta = jax.device_get(_metadata(jnp.asarray(sizes, jnp.int32), m, bm))
    num_tiles = int(meta.num_tiles[0])
    assert num_tiles == sum(-(-s // bm) for s in sizes)
    assert num_tiles <= max_tiles(m, len(sizes), bm) == meta.tile_group.shape[0]
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    np.testing.assert_array_equal(meta.group_end, ends)
    covered = []
    for t in range(num_tiles):
        grp, first = int(meta.tile_group[t]), int(meta.tile_first_row[t])
        rows = range(first, min(first + bm, int(meta.group_end[grp])))
        assert len(rows) > 0
        assert all(starts[grp] <= r < ends[grp] for r in rows), (t, grp, list(rows))
        covered.extend(rows)
    assert covered == list(range(sum(sizes))), "every grouped row in exactly one tile, in order"


def test_metadata_clamps_sizes_past_m():
    meta = group_metadata(jnp.asarray([5, 9, 4], jnp.int32), 10, 4)
    np.testing.assert_array_equal(meta.group_end, [5, 10, 10])
    assert int(meta.num_tiles[0]) == 2 + 2


# ----------------------------------------------------------------------------- tilings


def test_presets_divide_qwen_sizes():
    for tiling in (DECODE, PREFILL):
        for dim in (2048, 1408):
            assert dim % tiling.bn == 0 and dim % tiling.bk == 0, (tiling, dim)
    assert tiling_for_rows(1) is DECODE and tiling_for_rows(4096) is PREFILL
    for tiling in (DECODE, PREFILL):  # bf16 presets fit shared memory; fp32 gate/up gets fewer
        assert fit_stages(tiling, 2, 2) == tiling
        assert fit_stages(tiling, 4, 2).num_stages < tiling.num_stages
    assert fit_tiling(DECODE, 32, 16) == KernelTiling(
        16, 16, 32, DECODE.num_warps, DECODE.num_stages
    )


def test_bad_tilings_and_shapes_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        KernelTiling(bm=16, bn=48, bk=16)
    x, w, _, _ = _inputs(40, 5, jnp.float32)
    gs = jnp.asarray([8] * 5, jnp.int32)
    with pytest.raises(ValueError, match="multiple of the tiling's bk"):
        grouped_matmul(x, w, gs, tiling=KernelTiling(8, 16, 64), interpret=True)
    with pytest.raises(ValueError, match="at least 16"):
        grouped_matmul(x, w, gs, tiling=SMALL, interpret=False)
    with pytest.raises(ValueError, match="x's dtype"):
        grouped_matmul(x, w.astype(jnp.bfloat16), gs, interpret=True)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU refusal")
def test_default_refuses_non_gpu_backends():
    x, w, _, _ = _inputs(40, 5, jnp.float32)
    with pytest.raises(ValueError, match="interpret=True"):
        grouped_matmul(x, w, jnp.asarray([8] * 5, jnp.int32))


# ----------------------------------------------------------------------------- Triton lowering

# jaxlib ≤ 0.10.2 emits a Pallas Triton kernel as this custom call carrying the Triton IR (XLA
# compiles it); later jaxlibs compile to PTX while lowering and emit "triton_kernel_call_ffi".
TRITON_IR_CALL = "__gpu$xla.gpu.triton"
TRITON_CALLS = (TRITON_IR_CALL, "triton_kernel_call_ffi")


def _export_cuda(fn, *shapes):
    """Lowers ``fn`` for CUDA with the real (Triton) kernels, whatever this machine's backend.
    Export refuses custom calls without a stability guarantee unless told."""
    try:
        return jax.export.export(
            jax.jit(fn),
            platforms=("cuda",),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CALLS],
        )(*shapes)
    except RuntimeError as err:  # pragma: no cover - only on jaxlib > 0.10.2 without CUDA
        if "Triton compilation handler" not in str(err):
            raise
        pytest.skip(f"this jaxlib compiles Triton to PTX while lowering, and has no CUDA: {err}")


def _triton_calls(exported) -> list[tuple[str, bytes | None]]:
    """(target, Triton IR bytecode or None) of every Triton custom call in the export; the IR
    is run through the MLIR verifier (tt.dot shapes, power-of-two tensor sizes, ...)."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton.lowering import _new_ir_context
    except ImportError as err:  # pragma: no cover - depends on the jax version
        pytest.skip(f"reading the Triton IR back needs jax internals: {err}")
    calls = []
    with mlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())

        def walk(op):
            if op.name == "stablehlo.custom_call":
                target = ir.StringAttr(op.attributes["call_target_name"]).value
                if target == TRITON_IR_CALL:
                    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                    calls.append((target, ir.StringAttr(config["ir"]).value_bytes))
                elif target in TRITON_CALLS:
                    calls.append((target, None))
            for region in op.regions:
                for block in region.blocks:
                    for inner in block.operations:
                        walk(inner.operation)

        walk(module.operation)
    for _, blob in calls:
        if blob is not None:
            with _new_ir_context():
                assert ir.Module.parse(blob).operation.verify()
    return calls


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


QWEN_K, QWEN_N, QWEN_G = 2048, 1408, 75


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("m", [4, 4096], ids=["decode", "prefill"])
def test_kernels_lower_to_triton_for_cuda(m, dtype):
    """Qwen1.5-MoE sizes with the preset of each bucket: lowering only, nothing runs."""
    gs, rows = _sds((QWEN_G,), jnp.int32), _sds((m,), dtype)
    x, w = _sds((m, QWEN_K), dtype), _sds((QWEN_G, QWEN_K, QWEN_N), dtype)
    h, w_down = _sds((m, QWEN_N), dtype), _sds((QWEN_G, QWEN_N, QWEN_K), dtype)
    cases = [
        (lambda x, w, gs: grouped_matmul(x, w, gs, interpret=False), (x, w, gs)),
        (lambda x, w, gs: moe_gate_up(x, w, w, gs, interpret=False), (x, w, gs)),
        (lambda h, w, gs, r: moe_down(h, w, gs, r, interpret=False), (h, w_down, gs, rows)),
        (lambda h, w, gs: moe_down(h, w, gs, interpret=False), (h, w_down, gs)),
    ]
    for fn, shapes in cases:
        assert len(_triton_calls(_export_cuda(fn, *shapes))) == 1


def test_moe_dispatch_lowers_for_cuda_with_smallest_tiling():
    config = tiny_model_config()
    n, k, e = 24, config.num_experts_per_tok, config.num_experts
    d, f = config.hidden_size, config.moe_intermediate_size
    from brownout_jax.model.params import ExpertWeights

    def fn(x, ids, weights, mask, wg, wu, wd):
        return apply_experts_pallas(
            x,
            ids,
            weights,
            ExpertWeights(wg, wu, wd),
            mask,
            interpret=False,
            tiling=KernelTiling(16, 16, 16),
        )

    exported = _export_cuda(
        fn,
        _sds((n, d), jnp.bfloat16),
        _sds((n, k), jnp.int32),
        _sds((n, k), jnp.bfloat16),
        _sds((n,), jnp.bool_),
        _sds((e, d, f), jnp.bfloat16),
        _sds((e, d, f), jnp.bfloat16),
        _sds((e, f, d), jnp.bfloat16),
    )
    assert len(_triton_calls(exported)) == 2


# ----------------------------------------------------------------------------- the model


def test_model_logits_pallas_interpret_match_cpu_path():
    from brownout_jax.model.params import init_random_params
    from brownout_jax.model.transformer import forward_logits
    from brownout_jax.moe.expert_backend import ExpertBackend
    from brownout_jax.moe.options import MoeOptions

    config = tiny_model_config()
    params = init_random_params(config, jax.random.key(7), scale=0.3)
    tokens = jax.random.randint(jax.random.key(8), (2, 8), 0, config.vocab_size)
    lengths = jnp.asarray([8, 5], jnp.int32)  # padding is masked, never routed
    forward = jax.jit(forward_logits, static_argnums=(1, 4))
    ref = forward(params, config, tokens, lengths, MoeOptions())
    out = forward(
        params, config, tokens, lengths, MoeOptions(backend=ExpertBackend.PALLAS_INTERPRET)
    )
    for b, length in enumerate([8, 5]):
        assert rel_err(out[b, :length], ref[b, :length]) <= 1e-5


# ----------------------------------------------------------------------------- bench smoke


def test_bench_kernels_smoke_on_cpu():
    from brownout_jax.bench.kernels import run_kernel_bench

    result = run_kernel_bench(small=True, repeats=1, rows=(4,))
    assert result["small"] and result["interpret"] == (jax.default_backend() != "gpu")
    assert {r["impl"] for r in result["results"]} >= {"grouped_matmul", "ragged_dot", "dense"}
    assert all(r["seconds"] > 0 for r in result["results"])
