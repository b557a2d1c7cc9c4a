"""Paged attention as an XLA FFI custom call: checked, jittable (kernel: ``csrc/``,
``ffi_paged_attention.cc``; slow twin: :func:`paged_attention_reference`).

``paged_attention(q, k_pool, v_pool, tables, limits)``: query (b, t) of ``q`` (B, T, H, C)
attends to key positions ``[0, limits[b, t])`` of row b's sequence, whose key and value at
position s live in the pools (NB, BS, G, C) at ``[tables[b, s // BS], s % BS]``; KV head g
serves query heads g·R … g·R + R − 1 (R = H / G). Decode passes each row's position + 1;
a prefill chunk each token's position + 1 (causal over the cache written so far); padding 0
(its output is zeros). Keys and values are read in place, in the pool's dtype (float32, or
bfloat16 — also as its bits in uint16, how the engine stores them), only up to each row's
own length: nothing is gathered, converted or padded to a window. Softmax and accumulation
in float32; the output is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from brownout_jax.cpu_kernels.api import KernelUnavailableError
from brownout_jax.cpu_kernels.library import PAGED_ATTENTION_TARGET, Isa, load_library

_Q_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_POOL_DTYPES = (*_Q_DTYPES, jnp.dtype(jnp.uint16))


def _check(q, k_pool, v_pool, tables, limits) -> None:
    op = "paged_attention"
    if q.ndim != 4:
        raise ValueError(f"{op}: q must be (B, T, H, C), got shape {q.shape}")
    b, t, h, c = q.shape
    if k_pool.ndim != 4 or k_pool.shape[3] != c:
        raise ValueError(f"{op}: k_pool must be (NB, BS, G, C={c}), got {k_pool.shape}")
    if v_pool.shape != k_pool.shape or v_pool.dtype != k_pool.dtype:
        raise ValueError(
            f"{op}: v_pool must match k_pool {k_pool.shape} {k_pool.dtype}, got "
            f"{v_pool.shape} {v_pool.dtype}"
        )
    g = k_pool.shape[2]
    if h % g != 0:
        raise ValueError(f"{op}: q's {h} heads must be a multiple of the pools' {g} KV heads")
    if tables.ndim != 2 or tables.shape[0] != b:
        raise ValueError(f"{op}: tables must be ({b}, W), got {tables.shape}")
    if limits.shape != (b, t):
        raise ValueError(f"{op}: limits must be ({b}, {t}), got {limits.shape}")
    if jnp.dtype(q.dtype) not in _Q_DTYPES:
        raise ValueError(f"{op}: q must be float32 or bfloat16, got {q.dtype}")
    if jnp.dtype(k_pool.dtype) not in _POOL_DTYPES:
        raise ValueError(f"{op}: the pools must be float32 or bfloat16 (or uint16 bits)")


def paged_attention_runnable(head_dim: int, isa: Isa = Isa.AUTO) -> str | None:
    """Why the kernel cannot run here for this head dim, or None if it can."""
    library = load_library()
    if not library.available:
        return library.unavailable_reason
    if library.attention_isa_name(isa, head_dim) is None:
        return f"this CPU cannot run the {Isa(isa).name} copy for head dim {head_dim}"
    return None


def paged_attention(
    q: Float[Array, "B T H C"],
    k_pool: Array,
    v_pool: Array,
    tables: Int[Array, "B W"],
    limits: Int[Array, "B T"],
    *,
    isa: Isa = Isa.AUTO,
    max_threads: int = 0,
    split_keys: int = 0,
) -> Float[Array, "B T H C"]:
    """See the module docstring. ``isa`` forces a copy (tests); ``max_threads`` caps the
    threads (0: XLA's pool); ``split_keys`` sets the key positions per work item (0: the
    kernel's default; long contexts are split across items and merged)."""
    _check(q, k_pool, v_pool, tables, limits)
    reason = paged_attention_runnable(q.shape[3], isa)
    if reason is not None:
        raise KernelUnavailableError(f"paged_attention: {reason}")
    return jax.ffi.ffi_call(PAGED_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q,
        k_pool,
        v_pool,
        tables.astype(jnp.int32),
        limits.astype(jnp.int32),
        isa=np.int64(int(isa)),
        max_threads=np.int64(max_threads),
        split_keys=np.int64(split_keys),
    )


def paged_attention_reference(q, k_pool, v_pool, tables, limits, pool_dtype=None) -> np.ndarray:
    """The same contract in float64 NumPy, one query at a time (tests). ``pool_dtype``: the
    pools' value dtype when they hold bfloat16 as uint16 bits."""
    q = np.asarray(jnp.asarray(q, jnp.float32), np.float64)

    def values(pool):
        pool = jnp.asarray(pool)
        if pool_dtype is not None and pool.dtype == jnp.uint16:
            pool = jax.lax.bitcast_convert_type(pool, pool_dtype)
        return np.asarray(pool.astype(jnp.float32), np.float64)

    k, v = values(k_pool), values(v_pool)
    tables, limits = np.asarray(tables), np.asarray(limits)
    b, t, h, c = q.shape
    bs, g = k.shape[1], k.shape[2]
    r = h // g
    out = np.zeros((b, t, h, c))
    for row in range(b):
        for token in range(t):
            n = int(min(max(limits[row, token], 0), tables.shape[1] * bs))
            if n == 0:
                continue
            pos = np.arange(n)
            blocks = tables[row, pos // bs]
            keys, vals = k[blocks, pos % bs], v[blocks, pos % bs]  # (n, G, C)
            for head in range(h):
                scores = keys[:, head // r] @ q[row, token, head] / np.sqrt(c)
                weights = np.exp(scores - scores.max())
                out[row, token, head] = weights @ vals[:, head // r] / weights.sum()
    return out
