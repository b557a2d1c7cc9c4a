"""Pure-JAX twin of the grouped SwiGLU kernel: a loop over groups, each a dense masked matmul
(the Pallas kernels' references composed), fp32 at the highest precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from brownout_jax.cpu_kernels.packing import PackedWeight, unpack
from pallas_kernels.reference import moe_down_reference, moe_gate_up_reference


def grouped_swiglu_reference(
    x: Float[Array, "M D"],
    group_sizes: Int[Array, " G"],
    w_gate: Float[Array, "G D F"],
    w_up: Float[Array, "G D F"],
    w_down: Float[Array, "G F D"],
    row_weights: Float[Array, " M"] | None = None,
) -> Float[Array, "M D"]:
    """Same contract as ``grouped_swiglu``; rows past sum(group_sizes) are zero."""
    hidden = moe_gate_up_reference(x, w_gate, w_up, group_sizes, out_dtype=jnp.float32)
    return moe_down_reference(hidden, w_down, group_sizes, row_weights, out_dtype=jnp.float32)


def packed_linear_reference(x: Float[Array, "M K"], w: PackedWeight) -> Float[Array, "M N"]:
    """``x · unpack(w)`` in float32 at the highest precision."""
    return jnp.dot(
        x.astype(jnp.float32),
        unpack(w).astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
