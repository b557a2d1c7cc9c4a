"""The model's dense matmuls (attention projections, dense and shared-expert MLPs, LM head).

Three cases, by what the weight is:

* a ``PackedWeight`` (bf16 weights packed after loading, ``model.packed_params``): the packed
  C++ kernel (``cpu_kernels.packed_linear``: AMX tiles, AVX-512-BF16, …) or XLA's dot on the
  packed layout, whichever the weight's measured choice names for this row count;
* a float32 (K, N) array on a CPU backend with the library built: the streaming C++ kernel
  (``cpu_kernels.linear``) — XLA:CPU streams a decode-sized f32 matmul at about a quarter of
  the read bandwidth;
* anything else (bf16 weights left unpacked, another backend): XLA's dot.

The kernels have no gradient of their own: training (the demo's) differentiates through XLA's
dot; packed weights are for inference only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from brownout_jax.cpu_kernels.packing import MatmulPath, PackedWeight, packed_linear_xla
from brownout_jax.model.dims import Array, Bool, Float
from brownout_jax.model.params import DenseMlpParams

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def use_cpu_kernel(x, w) -> bool:
    """The streaming kernel for an unpacked weight, decided at trace time: a CPU backend, the
    library built, float32 weights (bf16 ones are packed, or left to XLA by measurement)."""
    if jax.default_backend() != "cpu" or isinstance(w, PackedWeight):
        return False
    if jnp.dtype(x.dtype) not in _KERNEL_DTYPES or jnp.dtype(w.dtype) != jnp.float32:
        return False
    from brownout_jax.cpu_kernels import load_library

    return load_library().available


@jax.custom_vjp
def _kernel_matmul(
    x: Float[Array, "M K"], w: Float[Array, "K N"], rows: Bool[Array, " M"]
) -> Float[Array, "M N"]:
    from brownout_jax.cpu_kernels import linear

    return linear(x, w, rows)


def _kernel_matmul_fwd(x, w, rows):
    return _kernel_matmul(x, w, rows), (x, w, rows)


def _kernel_matmul_bwd(residuals, grad):
    x, w, rows = residuals
    grad = jnp.where(rows[:, None], grad, 0)  # rows left out of the forward pass get none
    grad_x = jnp.dot(grad, w.T.astype(grad.dtype)).astype(x.dtype)
    grad_w = jnp.dot(x.T.astype(grad.dtype), grad).astype(w.dtype)
    return grad_x, grad_w, None


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def matmul_f32(
    x: Float[Array, "... K"], w: Float[Array, "K N"], rows: Bool[Array, "..."] | None = None
) -> Float[Array, "... N"]:
    """``x · w`` accumulated and returned in float32. ``rows`` (x's leading shape) marks the
    rows whose output is used: the kernels skip blocks of unused ones (bucket padding) and
    return zeros there; XLA's dot computes every row."""
    if isinstance(w, PackedWeight):
        return _packed_matmul(x, w, rows)
    if not use_cpu_kernel(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32)
    lead = x.shape[:-1]
    rows = jnp.ones(lead, bool) if rows is None else rows
    y = _kernel_matmul(x.reshape(-1, x.shape[-1]), w, rows.reshape(-1))
    return y.reshape(*lead, w.shape[-1])


def _packed_matmul(x, w: PackedWeight, rows):
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if w.path_for(x2.shape[0]) is MatmulPath.XLA:
        y = packed_linear_xla(x2, w)
    else:
        from brownout_jax.cpu_kernels import packed_linear

        mask = None if rows is None else rows.reshape(-1)
        y = packed_linear(x2, w, mask)
    return y.reshape(*lead, w.n)


def matmul(
    x: Float[Array, "... K"], w: Float[Array, "K N"], rows: Bool[Array, "..."] | None = None
) -> Float[Array, "... N"]:
    """``x · w`` in the activation dtype (fp32 accumulation), as HF's ``nn.Linear``."""
    if isinstance(w, PackedWeight):
        return _packed_matmul(x, w, rows).astype(x.dtype)
    if not use_cpu_kernel(x, w):
        return jnp.dot(x, w)
    return matmul_f32(x, w, rows).astype(x.dtype)


@functools.partial(jax.named_call, name="swiglu_mlp")
def swiglu_mlp(
    x: Float[Array, "N D"],
    w_gate: Float[Array, "D F"],
    w_up: Float[Array, "D F"],
    w_down: Float[Array, "F D"],
    rows: Bool[Array, " N"] | None = None,
) -> Float[Array, "N D"]:
    """SiLU(x · w_gate) ⊙ (x · w_up) · w_down, the dense and shared-expert MLP."""
    hidden = jax.nn.silu(matmul(x, w_gate, rows)) * matmul(x, w_up, rows)
    return matmul(hidden, w_down, rows)


def dense_mlp(
    x: Float[Array, "N D"], params: DenseMlpParams, token_mask: Bool[Array, " N"] | None = None
) -> Float[Array, "N D"]:
    """``token_mask``: rows whose output is used (padding may be skipped, and is then zero)."""
    return swiglu_mlp(x, params.w_gate, params.w_up, params.w_down, token_mask)
