"""The packed-weight kernels (csrc/packed_*.cc through XLA FFI): the matmul and the experts'
grouped SwiGLU on packed stacks, every ISA copy this CPU runs against a float64 NumPy
reference on random shapes across the tile edges (empty groups, rows past the groups, padded
depths); the AMX copy where the CPU has it (else a skip naming the missing feature); pack →
unpack is the identity; XLA's dot on the packed layout; threads; shape errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout_jax.cpu_kernels import (
    Isa,
    KernelUnavailableError,
    MatmulPath,
    PackedStack,
    PackedWeight,
    grouped_swiglu,
    load_library,
    pack,
    pack_stack,
    packed_grouped_swiglu,
    packed_linear,
    packed_linear_reference,
    packed_linear_xla,
    unpack,
    unpack_stack,
)

F32, BF16 = jnp.float32, jnp.bfloat16
_seeds = itertools.count(5000)
# Every copy multiplies the same bf16 values and accumulates in fp32: only the summation order
# differs from float64 (the AMX and bf16-dot copies add each pair's two products first).
TOLERANCE = 1e-5

pytestmark = pytest.mark.skipif(
    not load_library().available, reason="the C++ kernel library is not built"
)


def _copies(x_dtype, rows: int) -> list[Isa]:
    library = load_library()
    copies = (Isa.GENERIC, Isa.AVX2, Isa.AVX512, Isa.AVX512_BF16, Isa.AMX_BF16)
    return [
        isa for isa in copies if library.packed_isa_name(isa, x_dtype == BF16, rows) is not None
    ]


def _operands(m, k, n, x_dtype, seed=None):
    rng = np.random.default_rng(next(_seeds) if seed is None else seed)
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(max(k, 1)), BF16)
    return x, w


def _float64(x, w) -> np.ndarray:
    return np.asarray(jnp.asarray(x, F32), np.float64) @ np.asarray(jnp.asarray(w, F32), np.float64)


def _check(out, ref):
    out = np.asarray(out)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.all(np.isfinite(out))
    if ref.size and np.linalg.norm(ref) > 0:
        assert rel_err(out, ref) < TOLERANCE
    else:
        assert not np.any(out)


@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=["x_bf16", "x_f32"])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    [
        (1, 64, 32),  # one block, one pair chunk
        (5, 70, 45),  # K and N off the block: padded depth, a partial last block
        (7, 2048, 96),  # decode: more rows than one tile, depth in several chunks
        (24, 256, 200),  # the last chunked row count
        (40, 33, 100),  # odd K
        (130, 96, 64),  # prefill: several row chunks
        (600, 64, 33),  # AMX row tiles with a ragged end
        (0, 32, 32),
        (3, 0, 5),
    ],
)
def test_every_copy_matches_float64(m, k, n, x_dtype):
    x, w = _operands(m, k, n, x_dtype)
    packed = pack(w)
    ref = _float64(x, w)
    copies = _copies(x_dtype, m)
    assert Isa.GENERIC in copies
    for isa in copies:
        out = jax.jit(lambda a, b, isa=isa: packed_linear(a, b, isa=isa))(x, packed)
        _check(out, ref)
    _check(packed_linear(x, packed), ref)


@settings(max_examples=12, deadline=None)
@given(
    m=st.integers(1, 600),
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    bf16=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_shapes_match_float64(m, k, n, bf16, seed):
    x_dtype = BF16 if bf16 else F32
    x, w = _operands(m, k, n, x_dtype, seed)
    packed = pack(w)
    ref = _float64(x, w)
    for isa in _copies(x_dtype, m):
        _check(packed_linear(x, packed, isa=isa), ref)


def test_amx_copy_where_the_cpu_has_it():
    library = load_library()
    if library.packed_isa_name(Isa.AMX_BF16, True, 64) is None:
        pytest.skip("this CPU lacks AMX-BF16 (or Linux refused the AMX tile state)")
    for m, k, n in [(16, 32, 32), (33, 100, 70), (512, 2048, 160)]:
        x, w = _operands(m, k, n, BF16)
        _check(packed_linear(x, pack(w), isa=Isa.AMX_BF16), _float64(x, w))
    # AUTO takes tiles from 16 rows on and the bf16 vector copy below.
    assert library.packed_isa_name(Isa.AUTO, True, 16) == "amx_bf16"
    assert library.packed_isa_name(Isa.AUTO, True, 8) == "avx512_bf16"


def test_auto_resolves_to_the_best_copy_this_cpu_has():
    library = load_library()
    best_bf16 = library.packed_isa_name(Isa.AUTO, True, 1)
    for isa in (Isa.AVX512_BF16, Isa.AVX512, Isa.AVX2, Isa.GENERIC):
        name = library.packed_isa_name(isa, True, 1)
        if name is not None:
            assert best_bf16 == name
            break
    # bf16 pair dot products never take float32 x.
    assert library.packed_isa_name(Isa.AVX512_BF16, False, 1) is None
    assert library.packed_isa_name(Isa.AMX_BF16, False, 64) is None
    assert library.packed_isa_name(Isa.AUTO, False, 1) != "avx512_bf16"


@pytest.mark.parametrize(("k", "n"), [(1, 1), (31, 33), (64, 32), (2048, 100)])
def test_pack_unpack_is_the_identity(k, n):
    _, w = _operands(1, k, n, BF16)
    packed = pack(w)
    blocks, kp = -(-n // 32), -(-k // 32) * 16
    assert packed.data.shape == (blocks, kp, 64) and packed.shape == (k, n)
    np.testing.assert_array_equal(np.asarray(unpack(packed)), np.asarray(w))
    # The layout itself: packed[b, p, 2c + j] = w[2p + j, 32b + c].
    data, wn = np.asarray(packed.data), np.asarray(w)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r, c = int(rng.integers(k)), int(rng.integers(n))
        assert data[c // 32, r // 2, 2 * (c % 32) + r % 2] == wn[r, c]


def test_pack_gives_shapes_without_data_and_refuses_float32():
    spec = jax.ShapeDtypeStruct((100, 70), BF16)
    packed = jax.eval_shape(pack, spec)
    assert packed.data.shape == (3, 64, 64) and (packed.k, packed.n) == (100, 70)
    with pytest.raises(ValueError, match="bfloat16"):
        pack(jnp.zeros((4, 4), F32))


def test_xla_dot_on_the_packed_layout_and_the_reference_agree():
    x, w = _operands(9, 130, 77, BF16)
    packed = pack(w)
    ref = _float64(x, w)
    assert rel_err(jax.jit(packed_linear_xla)(x, packed), ref) < TOLERANCE
    assert rel_err(packed_linear_reference(x, packed), ref) < TOLERANCE


def test_threads_do_not_change_the_result():
    x, w = _operands(50, 300, 700, BF16)
    packed = pack(w)
    np.testing.assert_array_equal(
        np.asarray(packed_linear(x, packed)), np.asarray(packed_linear(x, packed, max_threads=1))
    )


def test_row_mask_skips_padding_and_keeps_real_rows_exact():
    x, w = _operands(20, 64, 96, BF16)
    packed = pack(w)
    mask = np.zeros(20, bool)
    mask[:3] = True
    out = np.asarray(packed_linear(x, packed, jnp.asarray(mask)))
    full = np.asarray(packed_linear(x, packed))
    np.testing.assert_array_equal(out[:3], full[:3])
    assert np.all(np.isfinite(out))


def test_path_choice_by_row_count():
    _, w = _operands(1, 64, 64, BF16)
    packed = pack(w)
    assert packed.path_for(1) is MatmulPath.KERNEL  # no choice measured: the kernel
    chosen = packed.with_paths(((8, MatmulPath.KERNEL), (512, MatmulPath.XLA)))
    assert [chosen.path_for(m) for m in (1, 8, 9, 512, 4096)] == [
        MatmulPath.KERNEL,
        MatmulPath.KERNEL,
        MatmulPath.XLA,
        MatmulPath.XLA,
        MatmulPath.XLA,
    ]
    # The choice is static: part of the tree structure, not a leaf.
    assert jax.tree_util.tree_structure(chosen) != jax.tree_util.tree_structure(packed)
    assert len(jax.tree_util.tree_leaves(chosen)) == 1


def test_shapes_and_copies_are_checked():
    x, w = _operands(4, 64, 32, BF16)
    packed = pack(w)
    with pytest.raises(ValueError, match="K=64"):
        packed_linear(x[:, :32], packed)
    with pytest.raises(ValueError, match="PackedWeight"):
        packed_linear(x, w)
    with pytest.raises(ValueError, match="row_mask"):
        packed_linear(x, packed, jnp.ones((5,), bool))
    with pytest.raises(KernelUnavailableError, match="bfloat16 x"):
        packed_linear(x.astype(F32), packed, isa=Isa.AVX512_BF16)
    assert isinstance(packed, PackedWeight)


# ---------------------------------------------------------------- packed expert stacks


def _expert_copies(x_dtype) -> list[Isa]:
    library = load_library()
    copies = (Isa.GENERIC, Isa.AVX2, Isa.AVX512, Isa.AVX512_BF16)
    return [i for i in copies if library.packed_experts_isa_name(i, x_dtype == BF16) is not None]


def _expert_problem(m, d, f, sizes, x_dtype, seed=None):
    rng = np.random.default_rng(next(_seeds) if seed is None else seed)
    g = len(sizes)
    x = jnp.asarray(rng.standard_normal((m, d)), x_dtype)
    w_gate = jnp.asarray(rng.standard_normal((g, d, f)) / np.sqrt(d), BF16)
    w_up = jnp.asarray(rng.standard_normal((g, d, f)) / np.sqrt(d), BF16)
    w_down = jnp.asarray(rng.standard_normal((g, f, d)) / np.sqrt(f), BF16)
    row_weights = jnp.asarray(rng.uniform(0.1, 1.0, m), F32)
    return x, jnp.asarray(sizes, jnp.int32), w_gate, w_up, w_down, row_weights


def _swiglu_float64(x, sizes, w_gate, w_up, w_down, row_weights) -> np.ndarray:
    as64 = lambda a: np.asarray(jnp.asarray(a, F32), np.float64)  # noqa: E731
    x, w_gate, w_up, w_down, row_weights = map(as64, (x, w_gate, w_up, w_down, row_weights))
    out, row = np.zeros_like(x), 0
    for g, size in enumerate(np.asarray(sizes)):
        rows = slice(row, row + int(size))
        gate, up = x[rows] @ w_gate[g], x[rows] @ w_up[g]
        out[rows] = (gate / (1.0 + np.exp(-gate)) * up) @ w_down[g] * row_weights[rows, None]
        row += int(size)
    return out


# The bf16-dot copy rounds the SiLU·up hidden rows to bf16 (as a bf16 model does): ~2^-9 each.
EXPERT_TOLERANCE = {Isa.AVX512_BF16: 1e-2}


@pytest.mark.parametrize("x_dtype", [BF16, F32], ids=["x_bf16", "x_f32"])
@pytest.mark.parametrize(
    ("m", "d", "f", "sizes"),
    [
        (3, 64, 32, [1, 0, 2]),  # decode: stream items, an empty group
        (10, 70, 45, [4, 0, 5]),  # D and F off the block: padded x and hidden rows
        (40, 192, 80, [10, 3, 0, 20, 7]),  # the demo's dims; chunked row counts
        (300, 128, 96, [150, 1, 0, 100, 39, 0]),  # prefill-sized groups; united at the end
        (12, 32, 32, [2, 3]),  # rows past the groups' sum come out zero
    ],
)
def test_packed_experts_every_copy_matches_float64(m, d, f, sizes, x_dtype):
    x, group_sizes, w_gate, w_up, w_down, row_weights = _expert_problem(m, d, f, sizes, x_dtype)
    ref = _swiglu_float64(x, sizes, w_gate, w_up, w_down, row_weights)
    stacks = [pack_stack(w) for w in (w_gate, w_up, w_down)]
    for isa in _expert_copies(x_dtype):
        out = jax.jit(lambda *a, isa=isa: packed_grouped_swiglu(*a, isa=isa))(
            x, group_sizes, *stacks, row_weights
        )
        out = np.asarray(out)
        assert rel_err(out, ref) < EXPERT_TOLERANCE.get(isa, TOLERANCE), isa
        assert not np.any(out[sum(sizes) :]), "rows past the groups must be zero"


@settings(max_examples=10, deadline=None)
@given(
    m=st.integers(1, 200),
    d=st.integers(1, 130),
    f=st.integers(1, 130),
    g=st.integers(1, 9),
    empty=st.floats(0, 0.7),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_experts_random_shapes_match_float64(m, d, f, g, empty, seed):
    rng = np.random.default_rng(seed)
    weights = rng.uniform(size=g) * (rng.uniform(size=g) >= empty)
    sizes = np.floor(weights / max(weights.sum(), 1e-9) * m).astype(int) if weights.any() else [0]
    sizes = [int(s) for s in sizes] + [0] * (g - len(sizes))
    x, group_sizes, w_gate, w_up, w_down, row_weights = _expert_problem(m, d, f, sizes, BF16, seed)
    ref = _swiglu_float64(x, sizes, w_gate, w_up, w_down, row_weights)
    stacks = [pack_stack(w) for w in (w_gate, w_up, w_down)]
    for isa in _expert_copies(BF16):
        out = np.asarray(packed_grouped_swiglu(x, group_sizes, *stacks, row_weights, isa=isa))
        if np.linalg.norm(ref) > 0:
            assert rel_err(out, ref) < EXPERT_TOLERANCE.get(isa, TOLERANCE)
        else:
            assert not np.any(out)


def test_packed_experts_agree_with_the_stored_layout_kernel():
    x, group_sizes, w_gate, w_up, w_down, row_weights = _expert_problem(
        24, 96, 64, [5, 0, 19], BF16
    )
    stacks = [pack_stack(w) for w in (w_gate, w_up, w_down)]
    packed = packed_grouped_swiglu(x, group_sizes, *stacks, row_weights)
    stored = grouped_swiglu(x, group_sizes, w_gate, w_up, w_down, row_weights)
    assert rel_err(packed, stored) < 1e-2


def test_pack_stack_round_trip_and_checks():
    _, _, w_gate, _, _, _ = _expert_problem(1, 70, 45, [1, 0, 0], BF16)
    stack = pack_stack(w_gate)
    assert isinstance(stack, PackedStack) and stack.shape == (3, 70, 45)
    np.testing.assert_array_equal(np.asarray(unpack_stack(stack)), np.asarray(w_gate))
    x, group_sizes, *_ = _expert_problem(4, 70, 45, [1, 0, 3], BF16)
    with pytest.raises(ValueError, match="PackedStacks"):
        packed_grouped_swiglu(x, group_sizes, w_gate, stack, stack)
    with pytest.raises(ValueError, match="D=64"):
        packed_grouped_swiglu(x[:, :64], group_sizes, stack, stack, stack)


def test_host_and_xla_packing_agree():
    from brownout_jax.cpu_kernels import packing

    _, w = _operands(1, 70, 45, BF16)
    np.testing.assert_array_equal(
        np.asarray(packing._pack_jit(w)), packing._pack_host(np.asarray(w))
    )
    _, _, stack, _, _, _ = _expert_problem(1, 33, 100, [1, 0, 0], BF16)
    np.testing.assert_array_equal(
        np.asarray(packing._pack_stack_jit(stack)), packing._pack_host(np.asarray(stack))
    )
