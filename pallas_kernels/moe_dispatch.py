"""Routed experts through the grouped-matmul kernels: the ``pallas`` backends of the MoE block.

Assignments (token, k) are sorted by expert with masked tokens sent to the end (they belong to
no group, so their rows come out zero); ``group_sizes`` counts each expert's assignments. Then
``moe_gate_up`` and ``moe_down`` (routing weight of each row in its epilogue, fp32 output) run
over the sorted rows, and each assignment's row is gathered back and summed over k — a gather,
not a scatter-add, so the result is deterministic.
"""

from __future__ import annotations

import jax.numpy as jnp

from brownout_jax.dims import Array, Bool, Float, Int
from brownout_jax.params import ExpertWeights
from pallas_kernels.api import moe_down, moe_gate_up
from pallas_kernels.tiling import KernelTiling


def sort_by_expert(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], num_experts: int
) -> tuple[Int[Array, " A"], Int[Array, " E"]]:
    """Assignment order sorted by expert (masked tokens last) and the rows of each expert."""
    a = expert_ids.size
    flat_expert = jnp.where(token_mask[:, None], expert_ids, num_experts).reshape(a)
    order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros(num_experts + 1, jnp.int32).at[flat_expert].add(1)[:num_experts]
    return order, group_sizes


def apply_experts_pallas(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    *,
    interpret: bool | None = None,
    tiling: KernelTiling | None = None,
) -> Float[Array, "N D"]:
    """Σ_k weight[n, k] · FFN_{expert[n, k]}(x[n]) with the Pallas grouped kernels."""
    n, k = expert_ids.shape
    d = x.shape[-1]
    order, group_sizes = sort_by_expert(expert_ids, token_mask, experts.num_experts)
    x_rows = x[order // k]  # A D, grouped by expert
    row_weights = expert_weights.reshape(n * k)[order]
    hidden = moe_gate_up(
        x_rows, experts.w_gate, experts.w_up, group_sizes, tiling=tiling, interpret=interpret
    )
    y_rows = moe_down(
        hidden,
        experts.w_down,
        group_sizes,
        row_weights,
        tiling=tiling,
        interpret=interpret,
        out_dtype=jnp.float32,
    )
    # Row of each assignment = its position in the sort; masked tokens' rows are zero.
    row_of_assignment = (
        jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    )
    y = y_rows[row_of_assignment].reshape(n, k, d).sum(axis=1)
    return y.astype(x.dtype)
