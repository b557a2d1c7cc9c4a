"""Routing: router → top-k experts per token, and assignments grouped by expert.

``sort_by_expert`` is the one place that groups (token, k) assignments by expert, with a
sentinel for those that belong to no expert here: tokens masked out (bucket padding) and ids
≥ ``num_experts`` (on an expert-parallel mesh, the experts of other devices). Brownout's
counts, the sorted-tiles path, the kernels' grouped glue and the per-device load statistics
all read it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brownout_jax.model.dims import Array, Bool, Float, Int


@struct.dataclass
class RouterOutput:
    expert_ids: Int[Array, "N K"]
    expert_weights: Float[Array, "N K"]  # in the activation dtype, as HF casts them
    router_probs: Float[Array, "N E"] | None  # full softmax, fp32 (load statistics, distillation)


def route_top_k(
    x: Float[Array, "N D"], router: Float[Array, "D E"], top_k: int, norm_topk_prob: bool
) -> RouterOutput:
    logits = jnp.dot(x, router)  # activation dtype, like HF's F.linear
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return RouterOutput(
        expert_ids=ids.astype(jnp.int32), expert_weights=weights.astype(x.dtype), router_probs=probs
    )


def _flat_expert(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], num_experts: int
) -> Int[Array, " A"]:
    """Each assignment's expert, ``num_experts`` (the sentinel) where it has none here."""
    flat = jnp.where(token_mask[:, None], expert_ids, num_experts).reshape(expert_ids.size)
    return jnp.minimum(flat, num_experts)


def _counts(flat: Int[Array, " A"], num_experts: int) -> Int[Array, " E"]:
    return jnp.zeros(num_experts + 1, jnp.int32).at[flat].add(1)[:num_experts]


def expert_counts(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], num_experts: int
) -> Int[Array, " E"]:
    """Assignments per expert over the real tokens (padding and the sentinel never count)."""
    return _counts(_flat_expert(expert_ids, token_mask, num_experts), num_experts)


@struct.dataclass
class ExpertOrder:
    """Assignments (flattened (token, k), A = N·K) grouped by expert."""

    order: Int[Array, " A"]  # assignment indices sorted by expert, sentinel ones last
    sorted_expert: Int[Array, " A"]  # expert of each sorted assignment; num_experts: none
    counts: Int[Array, " E"]  # assignments of each expert (the groups' sizes)


def sort_by_expert(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], num_experts: int
) -> ExpertOrder:
    flat = _flat_expert(expert_ids, token_mask, num_experts)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    return ExpertOrder(order=order, sorted_expert=flat[order], counts=_counts(flat, num_experts))
