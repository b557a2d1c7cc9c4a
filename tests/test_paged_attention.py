"""The paged-attention kernel (csrc/ffi_paged_attention.cc through XLA FFI): every ISA copy
this CPU runs against a float64 NumPy reference on random block tables and ragged lengths
(one token, exactly a block, the full window, rows of length 0), GQA ratios 1/2/8, bf16 (as
uint16 bits and as bf16) and f32 pools, query tiles with causal limits (prefill chunks), key
ranges split across items and merged; and the engine cache's two attention paths agree."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from brownout_jax.cpu_kernels import Isa, load_library
from brownout_jax.cpu_kernels.attention import paged_attention, paged_attention_reference
from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.paged_cache import KVPool, PagedKVCache

F32, BF16 = jnp.float32, jnp.bfloat16
# The kernel sums in float32 in another order than float64; exp is a degree-7 polynomial.
TOLERANCE = 1e-5
_seeds = itertools.count(9000)

pytestmark = pytest.mark.skipif(
    not load_library().available, reason="the C++ kernel library is not built"
)


def _copies(head_dim: int) -> list[Isa]:
    library = load_library()
    copies = (Isa.GENERIC, Isa.AVX2, Isa.AVX512)
    return [isa for isa in copies if library.attention_isa_name(isa, head_dim) is not None]


def _problem(b, t, h, g, c, bs, blocks, width, dtype, limits=None, bits=True):
    rng = np.random.default_rng(next(_seeds))
    q = jnp.asarray(rng.standard_normal((b, t, h, c)), dtype)
    pools = []
    for _ in range(2):
        pool = jnp.asarray(rng.standard_normal((blocks, bs, g, c)), dtype)
        if dtype == BF16 and bits:
            pool = jax.lax.bitcast_convert_type(pool, jnp.uint16)
        pools.append(pool)
    # Distinct random blocks per row (a real allocator never shares one between rows).
    tables = rng.permutation(blocks)[: b * width].reshape(b, width).astype(np.int32)
    if limits is None:
        limits = rng.integers(0, width * bs + 1, (b, t))
    return q, pools[0], pools[1], tables, np.asarray(limits, np.int32)


def _check(q, k, v, tables, limits, dtype, **kwargs):
    out = np.asarray(paged_attention(q, k, v, tables, limits, **kwargs))
    ref = paged_attention_reference(q, k, v, tables, limits, pool_dtype=dtype)
    assert not np.isnan(out).any()
    assert rel_err(out, ref) <= TOLERANCE
    # Rows attending nothing are exactly zero.
    assert not np.abs(out[np.asarray(limits) == 0]).any()
    return out


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("ratio", [1, 2, 8])
def test_decode_every_copy_equals_float64_on_ragged_rows(dtype, ratio):
    g, c, bs, width = 2, 64, 8, 6
    # One token, exactly a block, the full window, nothing, and random lengths.
    limits = [[1], [bs], [width * bs], [0], [13], [width * bs - 1]]
    problem = _problem(len(limits), 1, g * ratio, g, c, bs, 64, width, dtype, limits)
    for isa in _copies(c):
        _check(*problem, dtype, isa=isa)


@pytest.mark.parametrize("head_dim", [48, 128, 20])
def test_head_dims_pick_a_copy_whose_lanes_divide_them(head_dim):
    problem = _problem(3, 1, 4, 4, head_dim, 16, 24, 5, BF16)
    copies = _copies(head_dim)
    assert Isa.GENERIC in copies  # the scalar copy runs any head dim
    if head_dim == 20:
        assert Isa.AVX2 not in copies and Isa.AVX512 not in copies
    for isa in [Isa.AUTO, *copies]:
        _check(*problem, BF16, isa=isa)


@pytest.mark.parametrize("split", [0, 8, 24, 1000])
def test_long_rows_split_into_key_ranges_merge_exactly(split):
    """Splits of one block, of three, the default, and none; some rows shorter than a split."""
    limits = [[120], [7], [0], [64]]
    problem = _problem(4, 1, 8, 4, 32, 8, 80, 16, F32, limits)
    _check(*problem, F32, split_keys=split)


@pytest.mark.parametrize("ratio", [1, 4])
def test_prefill_chunk_tiles_attend_causally_over_the_cache(ratio):
    """A chunk of 21 tokens at positions 30…50 (and a second row starting at 0, padded after
    9 tokens): each token attends to positions up to its own."""
    t, start = 21, 30
    limits = np.zeros((2, t), np.int64)
    limits[0] = start + 1 + np.arange(t)
    limits[1, :9] = 1 + np.arange(9)
    problem = _problem(2, t, 2 * ratio, 2, 32, 8, 40, 8, BF16, limits)
    for isa in _copies(32):
        for split in (0, 16):
            _check(*problem, BF16, isa=isa, split_keys=split)


def test_bf16_as_its_own_dtype_reads_like_its_bits():
    problem = _problem(2, 1, 4, 2, 32, 8, 20, 4, BF16, bits=False)
    _check(*problem, BF16)


def test_threads_do_not_change_the_result():
    problem = _problem(5, 3, 8, 8, 64, 8, 60, 10, BF16)
    one = np.asarray(paged_attention(*problem, max_threads=1))
    every = np.asarray(paged_attention(*problem))
    assert np.array_equal(one, every)


def test_shapes_are_checked_naming_the_operand():
    q, k, v, tables, limits = _problem(2, 1, 4, 2, 32, 8, 20, 4, F32)
    with pytest.raises(ValueError, match="limits"):
        paged_attention(q, k, v, tables, limits[:, :0])
    with pytest.raises(ValueError, match="multiple of the pools"):
        paged_attention(q[:, :, :3], k, v, tables, limits)
    with pytest.raises(ValueError, match="v_pool"):
        paged_attention(q, k, v[:, :4], tables, limits)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_the_cache_attends_alike_on_both_paths(tiny_moe, dtype):
    """The engine cache after writes: the kernel on the pool in place equals XLA's gathered,
    masked window (decode and a prefill chunk)."""
    config = tiny_moe[0]
    rng = np.random.default_rng(3)
    bs, width = 8, 4
    pool = KVPool.allocate(config, 20, bs, dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, 20))[: 2 * width].reshape(2, width))
    cache = PagedKVCache(pool=pool, block_tables=tables)
    g, c = config.num_kv_heads, config.head_dim
    positions = jnp.asarray(np.tile(np.arange(27), (2, 1)), jnp.int32)
    for layer in range(config.num_layers):
        k = jnp.asarray(rng.standard_normal((2, 27, g, c)), dtype)
        v = jnp.asarray(rng.standard_normal((2, 27, g, c)), dtype)
        cache = cache.write(layer, k, v, positions)
    q = jnp.asarray(rng.standard_normal((2, 5, config.num_heads, c)), dtype)
    query_positions = jnp.asarray([[22, 23, 24, 25, 26], [0, 1, 2, 3, 4]], jnp.int32)
    mask = jnp.asarray([[True] * 5, [True, True, True, False, False]])
    kernel = cache.replace(attention=AttentionPath.KERNEL)
    for layer in range(config.num_layers):
        got = kernel.attend(layer, q, query_positions, mask)
        ref = cache.attend(layer, q, query_positions, mask)
        real = np.asarray(mask)
        tolerance = 1e-5 if dtype == F32 else 1e-2  # XLA rounds the probabilities to bf16
        assert rel_err(np.asarray(got)[real], np.asarray(ref, np.float32)[real]) <= tolerance
