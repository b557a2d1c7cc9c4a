"""The KV cache behind a small typed interface: ``write`` new keys/values, ``read`` a layer.

This is the contiguous per-sequence cache (each row of the batch owns ``max_len`` slots). The
serving engine's paged cache (block tables) implements the same two methods, so attention code
does not change with the cache layout.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import struct

from brownout_jax.config import ModelConfig
from brownout_jax.dims import Array, Float, Int


@struct.dataclass
class ContiguousKVCache:
    keys: tuple[Float[Array, "B S G C"], ...]  # one entry per layer
    values: tuple[Float[Array, "B S G C"], ...]

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32
    ) -> ContiguousKVCache:
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        return cls(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros))

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
        keys[layer] = keys[layer].at[rows, positions].set(k.astype(keys[layer].dtype), mode="drop")
        values[layer] = (
            values[layer].at[rows, positions].set(v.astype(values[layer].dtype), mode="drop")
        )
        return self.replace(keys=tuple(keys), values=tuple(values))

    def read(
        self, layer: int
    ) -> tuple[Float[Array, "B S G C"], Float[Array, "B S G C"], Int[Array, "B S"]]:
        """Keys, values and the position held by each slot (attention masks slots > query)."""
        k = self.keys[layer]
        slot_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
        return k, self.values[layer], slot_positions
