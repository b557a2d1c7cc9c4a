"""The packed-weight matmul (csrc/packed_*.cc through XLA FFI): every ISA copy this CPU runs
against a float64 NumPy reference on random shapes across the tile edges; the AMX copy where
the CPU has it (else a skip naming the missing feature); pack → unpack is the identity; XLA's
dot on the packed layout; threads; shape errors."""

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
    PackedWeight,
    load_library,
    pack,
    packed_linear,
    packed_linear_reference,
    packed_linear_xla,
    unpack,
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
        isa
        for isa in copies
        if library.packed_isa_name(isa, x_dtype == BF16, rows) is not None
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
