"""The one sort-by-expert: assignments grouped by expert, padding and foreign ids excluded."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from brownout_jax.moe.routing import expert_counts, sort_by_expert


@pytest.mark.parametrize("seed", range(5))
def test_groups_follow_a_stable_sort_and_the_sentinel_is_last(seed):
    rng = np.random.default_rng(seed)
    n, k, e = 23, 3, 7
    ids = rng.integers(0, e + 3, (n, k))  # ids ≥ e: another device's experts on a mesh
    mask = rng.random(n) > 0.25
    grouped = sort_by_expert(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), e)
    flat = np.where(mask[:, None], ids, e).reshape(-1)
    flat = np.minimum(flat, e)
    np.testing.assert_array_equal(grouped.order, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(grouped.sorted_expert, np.sort(flat, kind="stable"))
    expected = np.bincount(flat, minlength=e + 1)[:e]
    np.testing.assert_array_equal(grouped.counts, expected)
    np.testing.assert_array_equal(
        expert_counts(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), e), expected
    )
    real = int(expected.sum())
    assert np.all(np.asarray(grouped.sorted_expert)[real:] == e)  # the sentinel rows last
