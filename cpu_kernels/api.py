"""The CPU kernels as XLA FFI custom calls: checked, jittable.

**grouped_swiglu** — the routed experts' FFN.
``grouped_swiglu(x, group_sizes, w_gate, w_up, w_down, row_weights)`` computes, for every row
r of ``x`` in group g (rows sorted by group; group g owns the next ``group_sizes[g]`` rows),

    y[r] = row_weights[r] · (SiLU(x[r] · w_gate[g]) ⊙ (x[r] · w_up[g])) · w_down[g]

in float32, reading each non-empty group's weights once, in place, from the stacked arrays in
their stored dtype; empty groups cost nothing; rows past ``sum(group_sizes)`` come out zero.

**linear** — ``x (M, K) · w (K, N)`` in float32 from float32 or bfloat16 operands, for the dense
layers (attention projections, shared expert, LM head): XLA:CPU converts a whole bf16 weight
to f32 around a bf16 dot (for the LM head, 1.2 GB written per step), and streams weights at
~a quarter of the machine's bandwidth for decode-sized M.

Both run on XLA:CPU's intra-op thread pool (the caller's thread included). Shapes are checked
here, at trace time, with errors that name the operand. Inside ``jit`` and ``shard_map`` they
are ordinary custom calls (per device under a mesh); they have no gradient and no batching
rule of their own (the model's ``dense`` module adds a gradient through XLA's dot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from brownout_jax.cpu_kernels.library import (
    GROUPED_SWIGLU_TARGET,
    LINEAR_TARGET,
    PACKED_GROUPED_SWIGLU_TARGET,
    PACKED_LINEAR_TARGET,
    Isa,
    load_library,
)
from brownout_jax.cpu_kernels.packing import PackedStack, PackedWeight

_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class KernelUnavailableError(RuntimeError):
    """The compiled library is missing or cannot run the requested ISA copy here."""


def _check(x, group_sizes, w_gate, w_up, w_down, row_weights, op="grouped_swiglu") -> None:
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be (M, D), got shape {x.shape}")
    m, d = x.shape
    if w_gate.ndim != 3 or w_gate.shape[1] != d:
        raise ValueError(f"{op}: w_gate must be (G, D={d}, F), got {w_gate.shape}")
    g, _, f = w_gate.shape
    if w_up.shape != (g, d, f):
        raise ValueError(f"{op}: w_up must be {(g, d, f)} like w_gate, got {w_up.shape}")
    if w_down.shape != (g, f, d):
        raise ValueError(f"{op}: w_down must be {(g, f, d)}, got {w_down.shape}")
    if group_sizes.shape != (g,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(
            f"{op}: group_sizes must be ({g},) integers, got "
            f"{group_sizes.shape} {group_sizes.dtype}"
        )
    if row_weights is not None and row_weights.shape != (m,):
        raise ValueError(f"{op}: row_weights must be ({m},), got {row_weights.shape}")
    if jnp.dtype(x.dtype) not in _DTYPES:
        raise ValueError(f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    dtypes = {jnp.dtype(w.dtype) for w in (w_gate, w_up, w_down)}
    if len(dtypes) != 1 or dtypes.pop() not in _DTYPES:
        raise ValueError(
            f"{op}: w_gate, w_up and w_down must all be float32 or all bfloat16, got "
            f"{w_gate.dtype}, {w_up.dtype}, {w_down.dtype}"
        )


def _check_runnable(op: str, x_dtype, w_dtype, isa: Isa) -> None:
    library = load_library()
    if not library.available:
        raise KernelUnavailableError(f"{op}: {library.unavailable_reason}")
    all_bf16 = jnp.dtype(x_dtype) == jnp.bfloat16 and jnp.dtype(w_dtype) == jnp.bfloat16
    if library.isa_name(Isa(isa), all_bf16) is None:
        raise KernelUnavailableError(
            f"{op}: this CPU cannot run the {Isa(isa).name} copy"
            + ("" if all_bf16 else " (AVX512_BF16 needs bfloat16 x and weights)")
        )


def grouped_swiglu(
    x: Float[Array, "M D"],
    group_sizes: Int[Array, " G"],
    w_gate: Float[Array, "G D F"],
    w_up: Float[Array, "G D F"],
    w_down: Float[Array, "G F D"],
    row_weights: Float[Array, " M"] | None = None,
    *,
    isa: Isa = Isa.AUTO,
    max_threads: int = 0,
) -> Float[Array, "M D"]:
    """See the module docstring. ``isa`` forces one vector copy (tests; AUTO picks the best
    this CPU runs for these dtypes); ``max_threads`` caps the threads (0: XLA's pool size)."""
    _check(x, group_sizes, w_gate, w_up, w_down, row_weights)
    _check_runnable("grouped_swiglu", x.dtype, w_gate.dtype, isa)
    m, d = x.shape
    f = w_gate.shape[2]
    if row_weights is None:
        row_weights = jnp.ones((m,), jnp.float32)
    y, _hidden = jax.ffi.ffi_call(
        GROUPED_SWIGLU_TARGET,
        (jax.ShapeDtypeStruct((m, d), jnp.float32), jax.ShapeDtypeStruct((m, f), jnp.float32)),
    )(
        x,
        group_sizes.astype(jnp.int32),
        w_gate,
        w_up,
        w_down,
        row_weights.astype(jnp.float32),
        isa=np.int64(int(isa)),
        max_threads=np.int64(max_threads),
    )
    return y


def _check_packed_runnable(op: str, x, isa: Isa, copy_name) -> None:
    """x's dtype, the library, and the copy ``copy_name(library, x_bf16)`` resolves to."""
    if jnp.dtype(x.dtype) not in _DTYPES:
        raise ValueError(f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    library = load_library()
    if not library.available:
        raise KernelUnavailableError(f"{op}: {library.unavailable_reason}")
    x_bf16 = jnp.dtype(x.dtype) == jnp.bfloat16
    if copy_name(library, x_bf16) is None:
        raise KernelUnavailableError(
            f"{op}: this CPU cannot run the {Isa(isa).name} copy"
            + ("" if x_bf16 else " (AVX512_BF16 and AMX_BF16 need bfloat16 x)")
        )


def packed_grouped_swiglu(
    x: Float[Array, "M D"],
    group_sizes: Int[Array, " G"],
    w_gate: PackedStack,
    w_up: PackedStack,
    w_down: PackedStack,
    row_weights: Float[Array, " M"] | None = None,
    *,
    isa: Isa = Isa.AUTO,
    max_threads: int = 0,
) -> Float[Array, "M D"]:
    """``grouped_swiglu`` on packed stacks (``packing.pack_stack`` of the (G, D, F) and
    (G, F, D) weights): the same contract and scheduling, the tiles of the packed matmul."""
    stacks = (w_gate, w_up, w_down)
    if not all(isinstance(w, PackedStack) for w in stacks):
        raise ValueError("packed_grouped_swiglu: w_gate, w_up and w_down must be PackedStacks")
    _check(x, group_sizes, w_gate, w_up, w_down, row_weights, "packed_grouped_swiglu")
    m, d = x.shape
    f = w_gate.shape[2]
    _check_packed_runnable(
        "packed_grouped_swiglu", x, isa, lambda lib, bf16: lib.packed_experts_isa_name(isa, bf16)
    )
    if row_weights is None:
        row_weights = jnp.ones((m,), jnp.float32)
    f_padded = -(-f // 32) * 32
    y, _hidden = jax.ffi.ffi_call(
        PACKED_GROUPED_SWIGLU_TARGET,
        (
            jax.ShapeDtypeStruct((m, d), jnp.float32),
            jax.ShapeDtypeStruct((m, f_padded), jnp.float32),
        ),
    )(
        x,
        group_sizes.astype(jnp.int32),
        w_gate.data,
        w_up.data,
        w_down.data,
        row_weights.astype(jnp.float32),
        f=np.int64(f),
        isa=np.int64(int(isa)),
        max_threads=np.int64(max_threads),
    )
    return y


def linear(
    x: Float[Array, "M K"],
    w: Float[Array, "K N"],
    row_mask: Bool[Array, " M"] | None = None,
    *,
    isa: Isa = Isa.AUTO,
    max_threads: int = 0,
) -> Float[Array, "M N"]:
    """``x · w`` in float32, reading ``w`` once per 96 rows of x, in place, in its dtype.
    ``row_mask`` marks rows that need no output (bucket padding): blocks of rows with none
    needed are skipped and come out zero; other rows are exact either way."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"linear: x must be (M, K) and w (K, N), got {x.shape} and {w.shape}")
    if row_mask is not None and row_mask.shape != (x.shape[0],):
        raise ValueError(f"linear: row_mask must be ({x.shape[0]},), got {row_mask.shape}")
    for name, a in (("x", x), ("w", w)):
        if jnp.dtype(a.dtype) not in _DTYPES:
            raise ValueError(f"linear: {name} must be float32 or bfloat16, got {a.dtype}")
    _check_runnable("linear", x.dtype, w.dtype, isa)
    if row_mask is None:
        row_mask = jnp.ones((x.shape[0],), bool)
    return jax.ffi.ffi_call(
        LINEAR_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    )(x, w, row_mask.astype(bool), isa=np.int64(int(isa)), max_threads=np.int64(max_threads))


def packed_linear(
    x: Float[Array, "M K"],
    w: PackedWeight,
    row_mask: Bool[Array, " M"] | None = None,
    *,
    isa: Isa = Isa.AUTO,
    max_threads: int = 0,
) -> Float[Array, "M N"]:
    """``x · w`` in float32 with ``w`` in the packed layout (``packing.pack``). AUTO runs AMX
    tiles for 16 rows or more of bf16 x where the CPU has AMX-BF16, else the best vector copy
    (AVX-512-BF16 for bf16 x, then AVX-512, AVX2, scalar). ``row_mask`` as for ``linear``."""
    if not isinstance(w, PackedWeight):
        raise ValueError(f"packed_linear: w must be a PackedWeight, got {type(w).__name__}")
    if x.ndim != 2 or x.shape[1] != w.k:
        raise ValueError(f"packed_linear: x must be (M, K={w.k}), got shape {x.shape}")
    if row_mask is not None and row_mask.shape != (x.shape[0],):
        raise ValueError(f"packed_linear: row_mask must be ({x.shape[0]},), got {row_mask.shape}")
    _check_packed_runnable(
        "packed_linear", x, isa, lambda lib, bf16: lib.packed_isa_name(isa, bf16, x.shape[0])
    )
    if row_mask is None:
        row_mask = jnp.ones((x.shape[0],), bool)
    return jax.ffi.ffi_call(
        PACKED_LINEAR_TARGET, jax.ShapeDtypeStruct((x.shape[0], w.n), jnp.float32)
    )(
        x,
        w.data,
        row_mask.astype(bool),
        isa=np.int64(int(isa)),
        max_threads=np.int64(max_threads),
    )
