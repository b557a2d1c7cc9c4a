"""The KV cache interface the model is written against, and the contiguous cache.

:class:`KVCache`: ``write`` a layer's new keys/values at their positions, ``read`` a layer's
keys/values with the position each slot holds. Two caches implement it: the contiguous
per-sequence cache here (each row of the batch owns ``max_len`` slots; offline generation)
and the engine's paged cache (``engine/paged_cache.py``, block tables), so attention code does
not change with the cache layout.
"""

from __future__ import annotations

from typing import Protocol, Self

import jax.numpy as jnp
from flax import struct

from brownout_jax.model.attention import attend_positions
from brownout_jax.model.bit_storage import from_storage, storage_dtype, to_storage
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Float, Int


class KVCache(Protocol):
    def write(
        self,
        layer: int,
        k: Float[Array, "B T G C"],
        v: Float[Array, "B T G C"],
        positions: Int[Array, "B T"],
    ) -> Self:
        """The cache with each token's key/value stored at its position."""
        ...

    def read(
        self, layer: int
    ) -> tuple[Float[Array, "B S G C"], Float[Array, "B S G C"], Int[Array, "B S"]]:
        """Keys, values and the position held by each slot (attention masks slots past the
        query's position)."""
        ...

    def attend(
        self,
        layer: int,
        q: Float[Array, "B T H C"],
        positions: Int[Array, "B T"],
        token_mask: Bool[Array, "B T"],
    ) -> Float[Array, "B T H C"]:
        """Each query attends to the layer's cached keys at positions up to its own (the
        outputs of padding queries, ``token_mask`` False, are unused)."""
        ...


@struct.dataclass
class ContiguousKVCache:
    # One (B, S, G, C) entry per layer, ``dtype`` values stored as bit_storage.storage_dtype.
    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    dtype: jnp.dtype = struct.field(pytree_node=False)

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32
    ) -> ContiguousKVCache:
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        stored = storage_dtype(dtype)
        zeros = tuple(jnp.zeros(shape, stored) for _ in range(config.num_layers))
        return cls(
            keys=zeros,
            values=tuple(jnp.zeros(shape, stored) for _ in zeros),
            dtype=jnp.dtype(dtype),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]

    def write(
        self,
        layer: int,
        k: Float[Array, "B T G C"],
        v: Float[Array, "B T G C"],
        positions: Int[Array, "B T"],
    ) -> ContiguousKVCache:
        """Stores each token's key/value at its position; positions past the end are dropped."""
        rows = jnp.arange(k.shape[0])[:, None]
        keys, values = list(self.keys), list(self.values)
        keys[layer] = (
            keys[layer].at[rows, positions].set(to_storage(k.astype(self.dtype)), mode="drop")
        )
        values[layer] = (
            values[layer].at[rows, positions].set(to_storage(v.astype(self.dtype)), mode="drop")
        )
        return self.replace(keys=tuple(keys), values=tuple(values))

    def read(
        self, layer: int
    ) -> tuple[Float[Array, "B S G C"], Float[Array, "B S G C"], Int[Array, "B S"]]:
        """Keys, values and the position held by each slot (attention masks slots > query)."""
        k = from_storage(self.keys[layer], self.dtype)
        slot_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
        return k, from_storage(self.values[layer], self.dtype), slot_positions

    def attend(
        self,
        layer: int,
        q: Float[Array, "B T H C"],
        positions: Int[Array, "B T"],
        token_mask: Bool[Array, "B T"],
    ) -> Float[Array, "B T H C"]:
        del token_mask  # padding's outputs are unused
        k, v, key_positions = self.read(layer)
        return attend_positions(q, k, v, key_positions, positions)
