"""Routed experts as one grouped FFN over expert-sorted rows: the glue of the kernel backends.

Assignments (token, k) are sorted by expert, masked tokens last (they belong to no group, so
their rows come out zero); ``group_sizes`` counts each expert's rows. A grouped FFN — the C++
CPU kernel (``brownout_jax.cpu_kernels``) or the Pallas GPU kernels — maps the sorted rows to
their routing-weighted outputs, and each assignment's row is gathered back and summed over k:
a gather, not a scatter-add, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.params import ExpertWeights
from brownout_jax.moe.routing import sort_by_expert

# (sorted rows (A, D), group_sizes (E,), weights, row weights (A,)) → outputs (A, D), float32,
# zero past sum(group_sizes).
GroupedFfn = Callable[
    [Float[Array, "A D"], Int[Array, " E"], ExpertWeights, Float[Array, " A"]], Float[Array, "A D"]
]


def apply_experts_grouped(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    grouped_ffn: GroupedFfn,
) -> Float[Array, "N D"]:
    """Σ_k weight[n, k] · FFN_{expert[n, k]}(x[n]) through one grouped FFN call."""
    n, k = expert_ids.shape
    d = x.shape[-1]
    grouped = sort_by_expert(expert_ids, token_mask, experts.num_experts)
    order, group_sizes = grouped.order, grouped.counts
    x_rows = x[order // k]  # A D, grouped by expert
    row_weights = expert_weights.reshape(n * k)[order].astype(jnp.float32)
    y_rows = grouped_ffn(x_rows, group_sizes, experts, row_weights)
    # Row of each assignment = its position in the sort; masked tokens' rows are zero.
    row_of_assignment = (
        jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    )
    y = y_rows[row_of_assignment].reshape(n, k, d).sum(axis=1)
    return y.astype(x.dtype)


def cpu_kernel_ffn(x_rows, group_sizes, experts: ExpertWeights, row_weights):
    from brownout_jax.cpu_kernels import PackedStack, grouped_swiglu, packed_grouped_swiglu

    ffn = packed_grouped_swiglu if isinstance(experts.w_gate, PackedStack) else grouped_swiglu
    return ffn(x_rows, group_sizes, experts.w_gate, experts.w_up, experts.w_down, row_weights)


def apply_experts_cpu_kernel(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
) -> Float[Array, "N D"]:
    """The routed experts through the C++ CPU kernel (weights read in place, both cores)."""
    return apply_experts_grouped(x, expert_ids, expert_weights, experts, token_mask, cpu_kernel_ffn)


def apply_experts_pallas(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    *,
    interpret: bool | None = None,
    tiling=None,
) -> Float[Array, "N D"]:
    """The routed experts through the Pallas grouped kernels: ``moe_gate_up`` (SiLU·up) then
    ``moe_down`` (routing weight of each row in its epilogue, fp32 output)."""
    from pallas_kernels.api import moe_down, moe_gate_up  # GPU path, imported lazily

    def pallas_ffn(x_rows, group_sizes, experts: ExpertWeights, row_weights):
        hidden = moe_gate_up(
            x_rows, experts.w_gate, experts.w_up, group_sizes, tiling=tiling, interpret=interpret
        )
        return moe_down(
            hidden,
            experts.w_down,
            group_sizes,
            row_weights.astype(x_rows.dtype),
            tiling=tiling,
            interpret=interpret,
            out_dtype=jnp.float32,
        )

    return apply_experts_grouped(x, expert_ids, expert_weights, experts, token_mask, pallas_ffn)
