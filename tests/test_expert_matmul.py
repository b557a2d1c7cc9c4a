"""The sorted-tile expert path against the dense per-expert reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout_jax.model.params import ExpertWeights
from brownout_jax.moe.expert_matmul import (
    ExpertTiling,
    apply_experts_dense,
    apply_experts_sorted,
    sort_into_tiles,
)


def _random_problem(seed, n, d, f, e, k, masked_fraction=0.0, hot_experts=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    pool = e if hot_experts is None else hot_experts  # few distinct experts → many empty ones
    ids = np.stack([rng.choice(pool, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    weights = rng.random((n, k)).astype(np.float32)
    mask = rng.random(n) >= masked_fraction
    experts = ExpertWeights(
        w_gate=jnp.asarray(rng.standard_normal((e, d, f)).astype(np.float32) / np.sqrt(d)),
        w_up=jnp.asarray(rng.standard_normal((e, d, f)).astype(np.float32) / np.sqrt(d)),
        w_down=jnp.asarray(rng.standard_normal((e, f, d)).astype(np.float32) / np.sqrt(f)),
    )
    return jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights), experts, jnp.asarray(mask)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 40),
    e=st.sampled_from([1, 3, 8, 16]),
    k=st.integers(1, 4),
    block_rows=st.sampled_from([1, 3, 8, 32]),
    masked_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    hot=st.booleans(),
)
def test_sorted_tiles_match_dense_reference(seed, n, e, k, block_rows, masked_fraction, hot):
    k = min(k, e)
    hot_experts = max(k, e // 4) if hot else None
    x, ids, w, experts, mask = _random_problem(seed, n, 12, 10, e, k, masked_fraction, hot_experts)
    out = apply_experts_sorted(x, ids, w, experts, mask, ExpertTiling(block_rows))
    ref = apply_experts_dense(x, ids, w, experts, mask)
    assert np.all(np.isfinite(out))
    if not np.any(np.asarray(mask)):
        assert np.all(np.asarray(out) == 0)
    else:
        assert rel_err(out, ref) <= 1e-5


def test_masked_tokens_get_zero_and_do_not_disturb_others():
    x, ids, w, experts, _ = _random_problem(0, 10, 16, 8, 6, 2)
    mask = jnp.arange(10) % 3 != 0
    out = np.asarray(apply_experts_sorted(x, ids, w, experts, mask, ExpertTiling(4)))
    assert np.all(out[~np.asarray(mask)] == 0)
    kept = np.flatnonzero(np.asarray(mask))
    alone = apply_experts_sorted(x[kept], ids[kept], w[kept], experts, jnp.ones(len(kept), bool))
    assert rel_err(out[kept], alone) <= 1e-6


@pytest.mark.parametrize("block_rows", [1, 4, 16])
def test_tiles_cover_each_assignment_once_and_follow_non_empty_experts(block_rows):
    n, k, e = 13, 3, 20
    rng = np.random.default_rng(3)
    ids = np.stack([rng.choice(5, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    mask = np.ones(n, bool)
    mask[[2, 7]] = False
    tiles = jax.device_get(sort_into_tiles(jnp.asarray(ids), jnp.asarray(mask), e, block_rows))
    counts = np.bincount(ids[mask].ravel(), minlength=e)
    # Only experts with assignments get tiles: the loop's trip count follows non-empty experts.
    assert tiles.num_tiles == np.sum(-(-counts // block_rows))
    rows = tiles.assignment_row.reshape(n, k)
    p = tiles.row_token.shape[0]
    assert np.all(rows[~mask] == p)  # masked tokens are never routed
    live = rows[mask].ravel()
    assert len(set(live.tolist())) == live.size  # each assignment owns one row
    for (token, slot), row in np.ndenumerate(rows):
        if mask[token]:
            assert tiles.row_token[row] == token
            assert tiles.tile_expert[row // block_rows] == ids[token, slot]
