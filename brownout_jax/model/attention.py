"""Grouped-query attention over keys that carry their positions: the math every cache's
``attend`` shares when it is not a kernel (the slow twin of the paged-attention kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from brownout_jax.model.dims import Array, Bool, Float, Int


def attend(
    q: Float[Array, "B T H C"],
    k: Float[Array, "B S G C"],
    v: Float[Array, "B S G C"],
    mask: Bool[Array, "B T S"],
) -> Float[Array, "B T H C"]:
    """Grouped-query attention: each of G kv heads serves R = H // G query heads."""
    b, t, h, c = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, c)
    scores = jnp.einsum("btgrc,bsgc->bgrts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (c**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bgrts,bsgc->btgrc", probs, v)
    return out.reshape(b, t, h, c)


def attend_positions(
    q: Float[Array, "B T H C"],
    k: Float[Array, "B S G C"],
    v: Float[Array, "B S G C"],
    key_positions: Int[Array, "B S"],
    positions: Int[Array, "B T"],
) -> Float[Array, "B T H C"]:
    """Each query attends to the keys at positions up to its own (causal over a cache)."""
    return attend(q, k, v, key_positions[:, None, :] <= positions[:, :, None])
