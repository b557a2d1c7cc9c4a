"""Brownout routing: per MoE layer and step, cold assignments go to their group's united expert.

After top-k routing, assignments of the step's real tokens are counted per expert. Experts are
ranked by count (ties: lower id first); the *hot set* is the smallest prefix of that ranking
whose cumulative count reaches ``threshold × total assignments`` (threshold 0: empty). Every
other assignment is redirected to the united expert of its expert's group, keeping its routing
weight — except in a group where only one cold expert is active: redirecting it would read as
many weights as it saves, so it keeps its own expert (as the reference implementation does).

A request may be exempt (``BrownoutClass.NEVER``): its tokens (``exact_tokens``) keep their own
experts at every level. They still count towards the hot set, which is a property of the step's
whole load, so exempting a request changes no other request's routing.

Thresholds are exact fractions (``p / q``) so that the hot-set cut ``count · q ≥ p · total`` is
integer arithmetic, identical on every backend and in the NumPy reference.
"""

from __future__ import annotations

import fractions

import jax.numpy as jnp
import numpy as np

from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.params import MoeParams
from brownout_jax.moe.routing import RouterOutput, expert_counts, route_top_k


def threshold_fraction(threshold: float) -> tuple[int, int]:
    frac = fractions.Fraction(threshold).limit_denominator(1000)
    return frac.numerator, frac.denominator


def select_hot_experts(counts: Int[Array, " E"], threshold: float) -> Bool[Array, " E"]:
    """The smallest count-ranked prefix covering ``threshold`` of all assignments."""
    num, den = threshold_fraction(threshold)
    e = counts.shape[0]
    order = jnp.argsort(-counts, stable=True)  # by count, ties by lower id
    covered = jnp.cumsum(counts[order]) * den
    need = num * jnp.sum(counts)
    # First prefix length whose coverage reaches the need; 0 when nothing is needed.
    reached = covered >= need
    n_hot = jnp.where(need <= 0, 0, jnp.argmax(reached) + 1)
    hot_in_rank_order = jnp.arange(e) < n_hot
    return jnp.zeros(e, bool).at[order].set(hot_in_rank_order)


def route_with_brownout(
    expert_ids: Int[Array, "N K"],
    token_mask: Bool[Array, " N"],
    group_of_expert: Int[Array, " E"],
    num_groups: int,
    threshold: float,
) -> Int[Array, "N K"]:
    """Rewrites expert ids: hot experts stay, cold ones become ``E + group`` (united experts are
    stacked after the E originals)."""
    e = group_of_expert.shape[0]
    counts = expert_counts(expert_ids, token_mask, e)
    hot = select_hot_experts(counts, threshold)
    cold_active = (counts > 0) & ~hot
    cold_per_group = (
        jnp.zeros(num_groups, jnp.int32).at[group_of_expert].add(cold_active.astype(jnp.int32))
    )
    redirect = ~hot & (cold_per_group[group_of_expert] > 1)  # (E,)
    target = jnp.where(redirect, e + group_of_expert, jnp.arange(e, dtype=jnp.int32))
    return target[expert_ids].astype(jnp.int32)


def select_hot_experts_reference(counts: np.ndarray, threshold: float) -> np.ndarray:
    """Plain NumPy twin of :func:`select_hot_experts`, for tests."""
    num, den = threshold_fraction(threshold)
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    need = num * int(np.sum(counts))
    hot = np.zeros(len(counts), bool)
    covered = 0
    for i in order:
        if covered * den >= need:
            break
        hot[i] = True
        covered += int(counts[i])
    return hot


def route(
    x: Float[Array, "N D"],
    params: MoeParams,
    token_mask: Bool[Array, " N"],
    top_k: int,
    norm_topk_prob: bool,
    threshold: float,
    num_groups: int,
    exact_tokens: Bool[Array, " N"] | None = None,
) -> RouterOutput:
    """Top-k routing, then brownout at ``threshold`` (none at 1): the expert ids a step runs.
    ``num_groups``: united groups in the stacked layout (padded on an expert mesh);
    ``exact_tokens``: tokens never browned out (they keep their top-k experts)."""
    routing = route_top_k(x, params.router, top_k, norm_topk_prob)
    if threshold >= 1.0:
        return routing
    if params.group_of_expert is None:
        raise ValueError("a brownout threshold below 1 needs united experts (--united)")
    ids = route_with_brownout(
        routing.expert_ids, token_mask, params.group_of_expert, num_groups, threshold
    )
    if exact_tokens is not None:
        ids = jnp.where(exact_tokens[:, None], routing.expert_ids, ids)
    return routing.replace(expert_ids=ids)
