"""Public grouped-matmul entry points: validate, pick the tiling, build metadata, launch.

All three follow ``jax.lax.ragged_dot(x, w, group_sizes)``: x (m, k) has its rows sorted by
group, w (g, k, n) one matrix per group, group_sizes (g,) integers summing to at most m; rows
past the sum are zero in the output. Accumulation is fp32; the output has x's dtype unless
``out_dtype`` says otherwise.

``interpret``: None runs the Triton kernel on a GPU backend and refuses other backends with a
clear error (the model's CPU path is the tile loop of ``brownout_jax.moe.expert_matmul``); True runs
the kernel body in Pallas interpret mode on any backend (tests); False always lowers the real
Triton kernel, whatever the default backend — e.g. to export for CUDA from a CPU machine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.grouped_matmul import (
    Epilogue,
    grouped_call,
    identity_epilogue,
    row_scale_epilogue,
    swiglu_epilogue,
)
from pallas_kernels.metadata import group_metadata
from pallas_kernels.tiling import (
    KernelTiling,
    check_shapes,
    check_triton_dot,
    fit_stages,
    fit_tiling,
    tiling_for_rows,
)


def resolve_interpret(interpret: bool | None) -> bool:
    """None → the real kernel, which needs a GPU backend; True/False are taken as given."""
    if interpret is not None:
        return bool(interpret)
    backend = jax.default_backend()
    if backend != "gpu":
        raise ValueError(
            f"pallas_kernels: the grouped-matmul kernels are Triton GPU kernels, but JAX's "
            f"default backend is {backend!r}. Pass interpret=True to run them in Pallas "
            "interpret mode (slow; for tests), or use the CPU tile loop "
            "(brownout_jax.moe.expert_matmul, MoeOptions(backend=ExpertBackend.SORTED_TILES))"
        )
    return False


def _check_operands(x, weights, group_sizes, row_weights) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must be (m, k), got shape {x.shape}")
    m, k = x.shape
    first = weights[0]
    for w in weights:
        if w.ndim != 3 or w.shape[1] != k or w.shape != first.shape:
            raise ValueError(
                f"weights must all be (g, k={k}, n), got {[tuple(w.shape) for w in weights]}"
            )
        if w.dtype != x.dtype:
            raise ValueError(
                f"weights must have x's dtype {x.dtype} (the kernels do not cast a whole "
                f"weight stack), got {w.dtype}"
            )
    if group_sizes.shape != (first.shape[0],):
        raise ValueError(
            f"group_sizes must be ({first.shape[0]},) for {first.shape[0]} groups, "
            f"got shape {group_sizes.shape}"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    if row_weights is not None and row_weights.shape != (m,):
        raise ValueError(f"row_weights must be ({m},), got shape {row_weights.shape}")


def resolve_tiling(
    tiling: KernelTiling | None, m: int, k: int, n: int, itemsize: int = 2, projections: int = 1
) -> KernelTiling:
    """The given tiling (checked against the shapes) or the preset of m's bucket, fitted to the
    shapes and to shared memory."""
    if tiling is None:
        tiling = fit_tiling(tiling_for_rows(m), k, n)
        tiling = fit_stages(tiling, itemsize, projections)
    check_shapes(tiling, k, n)
    return tiling


@functools.partial(jax.jit, static_argnames=("tiling", "epilogue", "out_dtype", "interpret"))
def _grouped(x, weights, group_sizes, row_weights, *, tiling, epilogue, out_dtype, interpret):
    meta = group_metadata(group_sizes, x.shape[0], tiling.bm)
    return grouped_call(
        x,
        weights,
        meta,
        tiling=tiling,
        epilogue=epilogue,
        out_dtype=out_dtype,
        row_weights=row_weights,
        interpret=interpret,
    )


def _run(
    x: jax.Array,
    weights: tuple[jax.Array, ...],
    group_sizes: jax.Array,
    row_weights: jax.Array | None,
    epilogue: Epilogue,
    tiling: KernelTiling | None,
    interpret: bool | None,
    out_dtype,
) -> jax.Array:
    _check_operands(x, weights, group_sizes, row_weights)
    interpret = resolve_interpret(interpret)
    m, k = x.shape
    n = weights[0].shape[2]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if m == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    tiling = resolve_tiling(tiling, m, k, n, x.dtype.itemsize, len(weights))
    if not interpret:
        check_triton_dot(tiling)
    return _grouped(
        x,
        weights,
        group_sizes,
        row_weights,
        tiling=tiling,
        epilogue=epilogue,
        out_dtype=out_dtype,
        interpret=interpret,
    )


def grouped_matmul(
    x: Float[Array, "M K"],
    w: Float[Array, "G K N"],
    group_sizes: Int[Array, " G"],
    *,
    tiling: KernelTiling | None = None,
    interpret: bool | None = None,
    out_dtype=None,
) -> Float[Array, "M N"]:
    """``jax.lax.ragged_dot(x, w, group_sizes)``: out[r] = x[r] @ w[group(r)]."""
    return _run(x, (w,), group_sizes, None, identity_epilogue, tiling, interpret, out_dtype)


def moe_gate_up(
    x: Float[Array, "M K"],
    w_gate: Float[Array, "G K N"],
    w_up: Float[Array, "G K N"],
    group_sizes: Int[Array, " G"],
    *,
    tiling: KernelTiling | None = None,
    interpret: bool | None = None,
    out_dtype=None,
) -> Float[Array, "M N"]:
    """SiLU(x @ w_gate[group]) · (x @ w_up[group]) per row: both projections from one pass over
    each x tile, the SwiGLU in fp32, one rounding to the output dtype."""
    return _run(x, (w_gate, w_up), group_sizes, None, swiglu_epilogue, tiling, interpret, out_dtype)


def moe_down(
    h: Float[Array, "M K"],
    w_down: Float[Array, "G K N"],
    group_sizes: Int[Array, " G"],
    row_weights: Float[Array, " M"] | None = None,
    *,
    tiling: KernelTiling | None = None,
    interpret: bool | None = None,
    out_dtype=None,
) -> Float[Array, "M N"]:
    """h @ w_down[group] per row, times the row's routing weight (fp32 epilogue) when given."""
    if row_weights is None:
        return _run(
            h, (w_down,), group_sizes, None, identity_epilogue, tiling, interpret, out_dtype
        )
    return _run(
        h, (w_down,), group_sizes, row_weights, row_scale_epilogue, tiling, interpret, out_dtype
    )
