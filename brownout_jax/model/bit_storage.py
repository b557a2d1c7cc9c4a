"""bfloat16 arrays kept as their bits, for the gathers and scatters XLA:CPU would upcast whole.

XLA:CPU has no bf16 gather or scatter: it converts the *entire* operand to float32 and back
around one. For a KV pool updated every step, or a 151936-row embedding table read every
step, that is a full copy of the array per layer per step (measured: one 16-row scatter into
a 3 MB bf16 pool took 1.3 ms vs 6 µs in f32, and the demo engine ran 4× slower in bf16 than in
f32). The same bits as uint16 gather and scatter natively, and a bitcast back to bf16 fuses
into the gather that reads them, so caches *store* uint16 and weights are *read* through
``take_rows``. Other dtypes pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brownout_jax.model.dims import Array, Int

_BITS = {jnp.dtype(jnp.bfloat16): jnp.uint16}


def storage_dtype(dtype) -> jnp.dtype:
    """The dtype an array of ``dtype`` is stored as."""
    return jnp.dtype(_BITS.get(jnp.dtype(dtype), dtype))


def to_storage(x: Array) -> Array:
    bits = _BITS.get(jnp.dtype(x.dtype))
    return x if bits is None else jax.lax.bitcast_convert_type(x, bits)


def from_storage(stored: Array, dtype) -> Array:
    """The values of ``stored`` (from :func:`to_storage`) as ``dtype``."""
    if jnp.dtype(stored.dtype) == jnp.dtype(dtype):
        return stored
    return jax.lax.bitcast_convert_type(stored, dtype)


def take_rows(table: Array, index: Int[Array, "..."]) -> Array:
    """``table[index]`` without XLA:CPU's whole-table upcast for bf16."""
    return from_storage(to_storage(table)[index], table.dtype)
