"""Pure-JAX references of the grouped matmuls: a loop over groups, each a dense masked matmul.

Slow (every group multiplies every row) and obviously correct: group i owns rows
[start_i, end_i) of x, rows past sum(group_sizes) are zero. Products are fp32 at the highest
precision, and the result is rounded once to the output dtype, as the kernels do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _row_groups(group_sizes: Int[Array, " G"], m: int) -> Int[Array, " M"]:
    """Group of every row; rows past sum(group_sizes) get the out-of-range id G."""
    ends = jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right")


def _per_group(
    x: Float[Array, "M K"], weights: tuple[jax.Array, ...], group_sizes: Int[Array, " G"]
) -> tuple[jax.Array, ...]:
    """For each projection, Σ_i [row in group i] · x @ w[i] in fp32."""
    m = x.shape[0]
    row_group = _row_groups(group_sizes, m)
    xf = x.astype(jnp.float32)

    def one_group(accs, inputs):
        i, ws = inputs
        in_group = (row_group == i)[:, None]
        return tuple(
            acc + jnp.where(in_group, jnp.dot(xf, w.astype(jnp.float32), precision="highest"), 0)
            for acc, w in zip(accs, ws, strict=True)
        ), None

    n = weights[0].shape[2]
    zeros = tuple(jnp.zeros((m, n), jnp.float32) for _ in weights)
    groups = jnp.arange(group_sizes.shape[0], dtype=jnp.int32)
    accs, _ = jax.lax.scan(one_group, zeros, (groups, weights))
    return accs


def grouped_matmul_reference(
    x: Float[Array, "M K"], w: Float[Array, "G K N"], group_sizes: Int[Array, " G"], out_dtype=None
) -> Float[Array, "M N"]:
    """``jax.lax.ragged_dot(x, w, group_sizes)`` as a loop over groups."""
    (out,) = _per_group(x, (w,), group_sizes)
    return out.astype(out_dtype or x.dtype)


def moe_gate_up_reference(
    x: Float[Array, "M K"],
    w_gate: Float[Array, "G K N"],
    w_up: Float[Array, "G K N"],
    group_sizes: Int[Array, " G"],
    out_dtype=None,
) -> Float[Array, "M N"]:
    """SiLU(x @ w_gate[group]) · (x @ w_up[group]) per row, in fp32."""
    gate, up = _per_group(x, (w_gate, w_up), group_sizes)
    return (jax.nn.silu(gate) * up).astype(out_dtype or x.dtype)


def moe_down_reference(
    h: Float[Array, "M K"],
    w_down: Float[Array, "G K N"],
    group_sizes: Int[Array, " G"],
    row_weights: Float[Array, " M"] | None = None,
    out_dtype=None,
) -> Float[Array, "M N"]:
    """h @ w_down[group] per row, times the row's routing weight when given."""
    (out,) = _per_group(h, (w_down,), group_sizes)
    if row_weights is not None:
        out = out * row_weights.astype(jnp.float32)[:, None]
    return out.astype(out_dtype or h.dtype)
