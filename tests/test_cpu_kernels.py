"""The C++ grouped SwiGLU kernel (XLA FFI) against a float64 NumPy reference, for every vector
copy this CPU runs; threads, jit and shard_map; its MoE backend against the pure-JAX paths; the
fallback when the library is missing."""

from __future__ import annotations

import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from brownout_jax.cpu_kernels import (
    Isa,
    KernelUnavailableError,
    grouped_swiglu,
    grouped_swiglu_reference,
    linear,
    load_library,
)

F32, BF16 = jnp.float32, jnp.bfloat16
# fp32 multiply-adds: only summation order differs from float64. The bf16-dot copy rounds the
# SiLU·up hidden rows to bf16 before the down projection (as a bf16 model does): ~2^-9 each.
TOLERANCE = {Isa.GENERIC: 1e-5, Isa.AVX2: 1e-5, Isa.AVX512: 1e-5, Isa.AVX512_BF16: 1e-2}
_seeds = itertools.count(1000)


def _copies(x_dtype, w_dtype) -> list[Isa]:
    """The vector copies this CPU runs for these dtypes (GENERIC always)."""
    library = load_library()
    all_bf16 = x_dtype == BF16 and w_dtype == BF16
    return [
        isa
        for isa in (Isa.GENERIC, Isa.AVX2, Isa.AVX512, Isa.AVX512_BF16)
        if library.isa_name(isa, all_bf16) is not None
    ]


def _problem(m, d, f, sizes, x_dtype, w_dtype, seed=None):
    rng = np.random.default_rng(next(_seeds) if seed is None else seed)
    g = len(sizes)
    x = rng.standard_normal((m, d)).astype(np.float32)
    w_gate = (rng.standard_normal((g, d, f)) / np.sqrt(d)).astype(np.float32)
    w_up = (rng.standard_normal((g, d, f)) / np.sqrt(d)).astype(np.float32)
    w_down = (rng.standard_normal((g, f, d)) / np.sqrt(f)).astype(np.float32)
    row_weights = rng.uniform(0.1, 1.0, m).astype(np.float32)
    return (
        jnp.asarray(x, x_dtype),
        jnp.asarray(sizes, jnp.int32),
        jnp.asarray(w_gate, w_dtype),
        jnp.asarray(w_up, w_dtype),
        jnp.asarray(w_down, w_dtype),
        jnp.asarray(row_weights),
    )


def _float64_reference(x, sizes, w_gate, w_up, w_down, row_weights) -> np.ndarray:
    """Per group in float64, from the operands' own (possibly bf16-rounded) values."""
    as64 = lambda a: np.asarray(jnp.asarray(a, F32), np.float64)  # noqa: E731
    x, w_gate, w_up, w_down, row_weights = map(as64, (x, w_gate, w_up, w_down, row_weights))
    out = np.zeros_like(x)
    row = 0
    for g, size in enumerate(np.asarray(sizes)):
        rows = slice(row, row + int(size))
        gate, up = x[rows] @ w_gate[g], x[rows] @ w_up[g]
        hidden = gate / (1.0 + np.exp(-gate)) * up
        out[rows] = hidden @ w_down[g] * row_weights[rows, None]
        row += int(size)
    return out


def _check(out, ref, total, tolerance):
    out = np.asarray(out)
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out)), "kernel output has NaN/inf"
    assert np.all(out[total:] == 0), "rows past sum(group_sizes) must be zero"
    if total and np.any(ref[:total]):
        assert rel_err(out[:total], ref[:total]) <= tolerance


def test_library_is_built_and_picks_the_best_copy():
    library = load_library()
    assert library.available, library.unavailable_reason
    assert library.isa_name(Isa.GENERIC, False) == "generic"
    best = library.isa_name(Isa.AUTO, True)
    # AUTO takes the bf16-dot copy exactly when the CPU has it and x and weights are bf16.
    assert (best == "avx512_bf16") == (library.isa_name(Isa.AVX512_BF16, True) is not None)
    assert library.isa_name(Isa.AVX512_BF16, False) is None
    assert library.isa_name(Isa.AUTO, False) != "avx512_bf16"


GROUP_LAYOUTS = {
    "empty groups between": [0, 3, 0, 0, 5, 1, 0, 4],
    "one-row groups": [1, 1, 1, 1, 1, 1, 1, 1],
    "all rows on one group": [0, 0, 13, 0, 0, 0, 0, 0],
    "all groups empty": [0, 0, 0, 0, 0, 0, 0, 0],
    "rows past the sum": [2, 0, 3, 0, 1, 0, 0, 2],
}


@pytest.mark.parametrize("layout", GROUP_LAYOUTS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (F32, BF16), (BF16, F32), (BF16, BF16)])
def test_every_copy_matches_float64_on_group_layouts(layout, x_dtype, w_dtype):
    sizes = GROUP_LAYOUTS[layout]
    m = 13
    operands = _problem(m, 37, 21, sizes, x_dtype, w_dtype)  # odd D, F: every edge path
    ref = _float64_reference(*operands)
    for isa in _copies(x_dtype, w_dtype):
        out = jax.jit(lambda *a, isa=isa: grouped_swiglu(*a, isa=isa))(*operands)
        _check(out, ref, sum(sizes), TOLERANCE[isa])


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 70),
    d=st.integers(1, 150),
    f=st.integers(1, 100),
    g=st.integers(1, 12),
    empty_fraction=st.sampled_from([0.0, 0.5, 0.9]),
    slack=st.integers(0, 5),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_float64(m, d, f, g, empty_fraction, slack, bf16, seed):
    rng = np.random.default_rng(seed)
    total = max(0, m - slack)
    weights = np.where(rng.random(g) < empty_fraction, 0.0, rng.random(g) + 0.1)
    if weights.sum() == 0:
        weights[rng.integers(g)] = 1.0
    sizes = rng.multinomial(total, weights / weights.sum()).tolist()
    dtype = BF16 if bf16 else F32
    operands = _problem(m, d, f, sizes, dtype, dtype, seed)
    ref = _float64_reference(*operands)
    for isa in _copies(dtype, dtype):
        _check(grouped_swiglu(*operands, isa=isa), ref, total, TOLERANCE[isa])


@pytest.mark.parametrize(
    "m,d,f,active,g",
    [(128, 256, 176, 40, 75), (512, 128, 96, 15, 20)],
    ids=["decode-like", "prefill-like"],
)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_decode_and_prefill_sizes_with_united_experts(m, d, f, active, g, dtype):
    """Original and united experts in one stack (groups past E are united ones); few groups
    active, as under brownout."""
    rng = np.random.default_rng(7)
    sizes = np.zeros(g, np.int64)
    chosen = rng.choice(g, active, replace=False)
    sizes[chosen] = rng.multinomial(m - active, np.ones(active) / active) + 1
    operands = _problem(m, d, f, sizes.tolist(), dtype, dtype)
    ref = _float64_reference(*operands)
    auto = grouped_swiglu(*operands)
    _check(auto, ref, m, min(TOLERANCE[isa] for isa in _copies(dtype, dtype)[-1:]))
    one_thread = grouped_swiglu(*operands, max_threads=1)
    # Each item is computed by one thread with the same code: threads change nothing, bitwise.
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(one_thread))


def test_pure_jax_reference_agrees_with_float64():
    operands = _problem(11, 24, 12, [3, 0, 5, 2], F32, F32)
    ref = _float64_reference(*operands)
    _check(jax.jit(grouped_swiglu_reference)(*operands), ref, 10, 1e-5)


def test_shapes_are_checked_naming_the_operand():
    x, sizes, w_gate, w_up, w_down, row_weights = _problem(4, 8, 6, [2, 2], F32, F32)
    with pytest.raises(ValueError, match="w_down"):
        grouped_swiglu(x, sizes, w_gate, w_up, w_gate, row_weights)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_swiglu(x, sizes[:1], w_gate, w_up, w_down, row_weights)
    with pytest.raises(ValueError, match="row_weights"):
        grouped_swiglu(x, sizes, w_gate, w_up, w_down, row_weights[:3])
    with pytest.raises(ValueError, match="all be float32 or all bfloat16"):
        grouped_swiglu(x, sizes, w_gate.astype(BF16), w_up, w_down, row_weights)
    with pytest.raises(KernelUnavailableError, match="AVX512_BF16"):
        grouped_swiglu(x, sizes, w_gate, w_up, w_down, row_weights, isa=Isa.AVX512_BF16)


def test_under_shard_map_each_device_runs_its_own_groups():
    """Per device, as expert parallelism uses it: each device's rows against its own experts."""
    devices = jax.devices()[:4]
    if len(devices) < 4:
        pytest.skip("needs 4 host devices (conftest sets the XLA flag)")
    mesh = jax.sharding.Mesh(np.asarray(devices), ("expert",))
    per_device = [
        _problem(9, 16, 12, sizes, F32, F32, seed=i)
        for i, sizes in enumerate([[3, 0, 6], [0, 0, 0], [9, 0, 0], [1, 2, 3]])
    ]
    stacked = [jnp.stack(parts) for parts in zip(*per_device, strict=True)]

    def body(x, sizes, w_gate, w_up, w_down, row_weights):
        return grouped_swiglu(x[0], sizes[0], w_gate[0], w_up[0], w_down[0], row_weights[0])[None]

    spec = P("expert")
    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec))(*stacked)
    for i, operands in enumerate(per_device):
        total = int(np.sum(operands[1]))
        _check(out[i], _float64_reference(*operands), total, 1e-5)


def test_fallback_when_the_library_is_missing(monkeypatch, caplog):
    """Forced missing: AUTO resolves to the pure-JAX path and says so once; the API refuses."""
    from brownout_jax.moe import experts as moe

    monkeypatch.setenv("BROWNOUT_JAX_CPU_KERNELS", "off")
    load_library.cache_clear()
    moe._say_cpu_kernel_missing.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="brownout_jax"):
            assert moe.resolve_backend(moe.ExpertBackend.AUTO) is moe.ExpertBackend.SORTED_TILES
            assert moe.resolve_backend(moe.ExpertBackend.AUTO) is moe.ExpertBackend.SORTED_TILES
        messages = [
            r.getMessage() for r in caplog.records if "kernel unavailable" in r.getMessage()
        ]
        assert len(messages) == 1 and "BROWNOUT_JAX_CPU_KERNELS=off" in messages[0]
        with pytest.raises(KernelUnavailableError, match="turned off"):
            grouped_swiglu(*_problem(4, 8, 6, [2, 2], F32, F32))
    finally:
        monkeypatch.delenv("BROWNOUT_JAX_CPU_KERNELS")
        load_library.cache_clear()
        moe._say_cpu_kernel_missing.cache_clear()
    assert moe.resolve_backend(moe.ExpertBackend.AUTO) is moe.ExpertBackend.CPU_KERNEL


@pytest.mark.parametrize(
    "m,k,n", [(1, 7, 5), (16, 130, 70), (200, 64, 300), (3, 257, 1000), (20, 33, 1100)]
)
@pytest.mark.parametrize("x_dtype,w_dtype", [(F32, F32), (F32, BF16), (BF16, F32), (BF16, BF16)])
def test_linear_every_copy_matches_float64(m, k, n, x_dtype, w_dtype):
    """The dense layers' matmul: odd sizes (edge panels, odd depth), rows over one chunk."""
    rng = np.random.default_rng(m * 1000 + n)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), w_dtype)
    ref = np.asarray(jnp.asarray(x, F32), np.float64) @ np.asarray(jnp.asarray(w, F32), np.float64)
    for isa in _copies(x_dtype, w_dtype):
        out = np.asarray(linear(x, w, isa=isa))
        assert out.dtype == np.float32 and out.shape == (m, n)
        assert rel_err(out, ref) <= 1e-5
    np.testing.assert_array_equal(np.asarray(linear(x, w)), np.asarray(linear(x, w, max_threads=1)))


def test_linear_shapes_are_checked():
    with pytest.raises(ValueError, match="x must be"):
        linear(jnp.ones((3, 4)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="w must be float32 or bfloat16"):
        linear(jnp.ones((3, 4)), jnp.ones((4, 2), jnp.float16))


def test_linear_row_mask_skips_padding_and_keeps_real_rows_exact():
    """Bucket padding: rows marked unused come out zero when their whole block is unused;
    every used row equals the unmasked product (and nothing is NaN even if padding is)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 33)).astype(np.float32)
    x[20:] = np.nan  # padding rows hold garbage; they must not leak anywhere
    rows = np.arange(40) < 20
    w = jnp.asarray(rng.standard_normal((33, 70)), BF16)
    for dtype in (F32, BF16):
        xs = jnp.asarray(x, dtype)
        clean = jnp.where(jnp.asarray(rows)[:, None], xs, 0)
        for isa in _copies(dtype, BF16):
            full = np.asarray(linear(clean, w, isa=isa))
            out = np.asarray(linear(xs, w, jnp.asarray(rows), isa=isa))
            np.testing.assert_array_equal(out[:20], full[:20])
            assert np.all(out[24:] == 0), "blocks of unused rows are skipped and zero"
