"""Brownout routing: hot-set selection, redirection to united experts, exactness at 1."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from brownout_jax.model.params import ExpertWeights, MoeParams
from brownout_jax.model.transformer import forward_logits
from brownout_jax.moe.block import moe_block
from brownout_jax.moe.brownout import (
    route,
    route_with_brownout,
    select_hot_experts,
    select_hot_experts_reference,
)
from brownout_jax.moe.expert_matmul import apply_experts_dense, apply_experts_sorted
from brownout_jax.moe.ladder import DEFAULT_LADDER, ThresholdLadder
from brownout_jax.moe.options import MoeOptions
from brownout_jax.moe.routing import route_top_k

THRESHOLDS = st.one_of(st.sampled_from(DEFAULT_LADDER.levels), st.floats(0.0, 1.0))


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=24),  # small ints → many ties
    threshold=THRESHOLDS,
)
def test_hot_set_equals_numpy_reference(counts, threshold):
    counts = np.asarray(counts, np.int32)
    hot = np.asarray(select_hot_experts(jnp.asarray(counts), threshold))
    assert hot.tolist() == select_hot_experts_reference(counts, threshold).tolist()


def test_hot_set_edges():
    counts = jnp.asarray([5, 0, 3, 3, 1])
    assert not np.asarray(select_hot_experts(counts, 0.0)).any()
    assert np.asarray(select_hot_experts(counts, 1.0)).tolist() == [True, False, True, True, True]
    # 0.5 × 12 = 6 → expert 0 (5) is not enough; ties 2/3 break by lower id → {0, 2}.
    assert np.asarray(select_hot_experts(counts, 0.5)).tolist() == [True, False, True, False, False]


def _redirect_reference(ids, mask, group, threshold):
    e = len(group)
    counts = np.bincount(ids[mask].ravel(), minlength=e)
    hot = select_hot_experts_reference(counts, threshold)
    out = ids.copy()
    for g in np.unique(group):
        cold_active = [x for x in np.flatnonzero(group == g) if counts[x] > 0 and not hot[x]]
        if len(cold_active) > 1:
            for x in cold_active:
                out[ids == x] = e + g
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=THRESHOLDS, way=st.sampled_from([1, 2, 4, 8]))
def test_redirection_matches_reference(seed, threshold, way):
    rng = np.random.default_rng(seed)
    e, n, k = 16, int(rng.integers(1, 20)), 4
    ids = np.stack([rng.choice(e, k, replace=False, p=_zipf(e)) for _ in range(n)]).astype(np.int32)
    mask = rng.random(n) > 0.2
    group = (np.arange(e) // way).astype(np.int32)
    got = route_with_brownout(
        jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(group), -(-e // way), threshold
    )
    expected = _redirect_reference(ids, mask, group, threshold)
    assert np.asarray(got)[mask].tolist() == expected[mask].tolist()


def _zipf(e):
    p = 1.0 / np.arange(1, e + 1)
    return p / p.sum()


def _moe_problem(seed, united_scale=1.0):
    rng = np.random.default_rng(seed)
    d, f, e, u = 16, 12, 16, 4

    def w(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2]))

    experts = ExpertWeights(w(e + u, d, f), w(e + u, d, f), w(e + u, f, d))
    experts = dataclasses.replace(
        experts,
        w_down=experts.w_down.at[e:].multiply(united_scale),
    )
    params = MoeParams(
        router=w(d, e),
        experts=experts,
        shared=None,
        shared_gate=None,
        group_of_expert=jnp.asarray(np.arange(e) // 4, jnp.int32),
    )
    x = jnp.asarray(rng.standard_normal((24, d)).astype(np.float32))
    mask = jnp.asarray(rng.random(24) > 0.25)
    return x, params, mask


def _originals_only(params: MoeParams) -> MoeParams:
    e = params.group_of_expert.shape[0]
    experts = jax.tree_util.tree_map(lambda a: a[:e], params.experts)
    return params.replace(experts=experts, group_of_expert=None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_one_is_the_original_moe_for_any_united_experts(seed):
    x, params, mask = _moe_problem(seed, united_scale=100.0)  # wild united experts
    original = moe_block(x, _originals_only(params), mask, 4, False, MoeOptions()).out
    at_one = moe_block(x, params, mask, 4, False, MoeOptions(threshold=1.0)).out
    assert rel_err(at_one, original) <= 1e-6
    # Below 1 the united experts really are used.
    assert (
        rel_err(moe_block(x, params, mask, 4, False, MoeOptions(threshold=0.0)).out, original) > 0.1
    )


def test_way_one_united_equal_originals_gives_the_original_at_every_threshold():
    x, params, mask = _moe_problem(3)
    e = params.group_of_expert.shape[0]
    originals = _originals_only(params)
    twins = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), originals.experts)
    way_one = params.replace(experts=twins, group_of_expert=jnp.arange(e, dtype=jnp.int32))
    reference = moe_block(x, originals, mask, 4, False, MoeOptions()).out
    for level in DEFAULT_LADDER.levels:
        got = moe_block(x, way_one, mask, 4, False, MoeOptions(threshold=level)).out
        assert rel_err(got, reference) <= 1e-6


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_fast_path_with_united_experts_matches_dense_twin(threshold):
    x, params, mask = _moe_problem(4)
    routing = route_top_k(x, params.router, 4, False)
    ids = route_with_brownout(routing.expert_ids, mask, params.group_of_expert, 4, threshold)
    assert int(jnp.max(jnp.where(mask[:, None], ids, 0))) >= 16 or threshold > 0
    fast = apply_experts_sorted(x, ids, routing.expert_weights, params.experts, mask)
    dense = apply_experts_dense(x, ids, routing.expert_weights, params.experts, mask)
    assert rel_err(fast, dense) <= 1e-5


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_exact_tokens_keep_their_experts_and_the_hot_set_counts_every_token(threshold):
    # Cases where a hot set over the other tokens alone would route them differently (at 0 the
    # hot set is empty whatever is counted).
    teeth = 0
    for seed in range(8):
        x, params, mask = _moe_problem(seed)
        exact = jnp.asarray(np.random.default_rng(100 + seed).random(24) < 0.4)
        top_k = route_top_k(x, params.router, 4, False).expert_ids
        plain = route(x, params, mask, 4, False, threshold, 4).expert_ids
        got = route(x, params, mask, 4, False, threshold, 4, exact_tokens=exact).expert_ids
        exact_np, others = np.asarray(exact), np.asarray(mask & ~exact)
        assert np.asarray(got)[exact_np].tolist() == np.asarray(top_k)[exact_np].tolist()
        assert np.asarray(got)[others].tolist() == np.asarray(plain)[others].tolist()
        # Brownout is really on for the others, so keeping top-k ids above is not vacuous.
        assert (np.asarray(plain)[exact_np & np.asarray(mask)] >= 16).any()
        without_exact = route_with_brownout(
            top_k, mask & ~exact, params.group_of_expert, 4, threshold
        )
        teeth += np.asarray(without_exact)[others].tolist() != np.asarray(plain)[others].tolist()
    assert teeth > 0 or threshold == 0.0


def test_model_level_threshold_one_exact_and_exempt_layers(tiny_moe):
    config, params, _, browned, _ = tiny_moe
    ids = jnp.asarray(np.random.default_rng(5).integers(0, config.vocab_size, (3, 20)))
    lengths = jnp.asarray([20, 13, 7])
    ref = np.asarray(forward_logits(params, config, ids, lengths))
    at_one = forward_logits(browned, config, ids, lengths, MoeOptions(threshold=1.0))
    assert rel_err(at_one, ref) <= 1e-6
    all_exempt = MoeOptions(threshold=0.0, exempt_layers=config.moe_layers)
    assert rel_err(forward_logits(browned, config, ids, lengths, all_exempt), ref) <= 1e-6
    at_zero = np.asarray(forward_logits(browned, config, ids, lengths, MoeOptions(threshold=0.0)))
    assert np.isfinite(at_zero).all() and rel_err(at_zero, ref) > 1e-3


def test_threshold_below_one_without_united_experts_is_refused(tiny_moe):
    config, params, *_ = tiny_moe
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="united experts"):
        forward_logits(params, config, ids, jnp.asarray([4]), MoeOptions(threshold=0.5))


def test_ladder_snaps_down_and_validates():
    assert DEFAULT_LADDER.snap(0.35) == 0.3
    assert DEFAULT_LADDER.snap(1.0) == 1.0
    assert DEFAULT_LADDER.snap(0.0) == 0.0
    assert ThresholdLadder((0.5, 1.0)).snap(0.2) == 0.5  # nothing below: the lowest level
    with pytest.raises(ValueError, match="top level"):
        ThresholdLadder((0.0, 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DEFAULT_LADDER.snap(1.5)
