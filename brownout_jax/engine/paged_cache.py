"""Paged KV cache (vLLM-style): fixed-size blocks in one pool, a block table per sequence.

Device side, :class:`PagedKVCache` implements the same ``write``/``read`` interface as the
contiguous cache: token t of row b lives in slot ``table[b, t // block] * block + t % block``.
Block 0 is never allocated: unused table entries point at it, so writes of bucket padding land
there harmlessly and reads of it are masked by position. The host side (which block ids a
sequence holds) is ``blocks.BlockAllocator``. ``attend`` runs the paged-attention kernel on
the pool in place, or (the XLA path) gathers each row's window with ``read`` and masks it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brownout_jax.cpu_kernels.attention import paged_attention
from brownout_jax.engine.attention_path import AttentionPath
from brownout_jax.engine.blocks import NULL_BLOCK
from brownout_jax.model.attention import attend_positions
from brownout_jax.model.bit_storage import from_storage, storage_dtype, to_storage
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Float, Int


@struct.dataclass
class KVPool:
    """The persistent block pool: one (blocks, block_size, G, C) array per layer for k and v,
    of ``dtype`` values stored as ``bit_storage.storage_dtype(dtype)`` (bf16 as its bits)."""

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    dtype: jnp.dtype = struct.field(pytree_node=False)

    @classmethod
    def allocate(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype) -> KVPool:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        stored = storage_dtype(dtype)
        return cls(
            keys=tuple(jnp.zeros(shape, stored) for _ in range(config.num_layers)),
            values=tuple(jnp.zeros(shape, stored) for _ in range(config.num_layers)),
            dtype=jnp.dtype(dtype),
        )

    @classmethod
    def abstract(cls, config: ModelConfig, num_blocks: int, block_size: int, dtype) -> KVPool:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        layer = jax.ShapeDtypeStruct(shape, storage_dtype(dtype))
        return cls(
            keys=(layer,) * config.num_layers,
            values=(layer,) * config.num_layers,
            dtype=jnp.dtype(dtype),
        )


def kv_pool_bytes(config: ModelConfig, num_blocks: int, block_size: int, dtype) -> int:
    """Bytes of the pool: keys and values of every layer."""
    per_layer = num_blocks * block_size * config.num_kv_heads * config.head_dim
    return 2 * config.num_layers * per_layer * jnp.dtype(dtype).itemsize


def available_memory_bytes() -> int | None:
    """What Linux says a new allocation can still get (MemAvailable), None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_kv_pool_fits(config: ModelConfig, num_blocks: int, block_size: int, dtype) -> None:
    """Refuses, naming the flag, a pool this machine cannot hold next to what is loaded: an
    allocation past it would fail inside a step, or swap the server to a halt."""
    need = kv_pool_bytes(config, num_blocks, block_size, dtype)
    available = available_memory_bytes()
    if available is not None and need > available:
        raise ValueError(
            f"the KV pool of {num_blocks} blocks (--kv-blocks) × {block_size} tokens needs "
            f"{need / 2**30:.2f} GiB, but only {available / 2**30:.2f} GiB of memory is "
            "available: lower --kv-blocks (or --max-batch / --max-model-len, which size it "
            "by default)"
        )


@struct.dataclass
class PagedKVCache:
    pool: KVPool
    block_tables: Int[Array, "B W"]  # block ids of each row, in order; NULL_BLOCK past the end
    # KERNEL reads the pool in place (cpu_kernels.attention); XLA gathers the rows' windows.
    attention: AttentionPath = struct.field(pytree_node=False, default=AttentionPath.XLA)

    @property
    def block_size(self) -> int:
        return self.pool.keys[0].shape[1]

    def _slots(self, positions: Int[Array, "B T"]) -> Int[Array, "B T"]:
        bs = self.block_size
        width = self.block_tables.shape[1]
        index = jnp.minimum(positions // bs, width - 1)
        block = jnp.take_along_axis(self.block_tables, index, axis=1)
        block = jnp.where(positions // bs < width, block, NULL_BLOCK)
        return block * bs + positions % bs

    def write(
        self,
        layer: int,
        k: Float[Array, "B T G C"],
        v: Float[Array, "B T G C"],
        positions: Int[Array, "B T"],
    ) -> PagedKVCache:
        slots = self._slots(positions).reshape(-1)
        keys, values = list(self.pool.keys), list(self.pool.values)
        for store, new in ((keys, k), (values, v)):
            pool = store[layer]
            flat = pool.reshape(-1, *pool.shape[2:])
            rows = to_storage(new.reshape(-1, *new.shape[2:]).astype(self.pool.dtype))
            store[layer] = flat.at[slots].set(rows).reshape(pool.shape)
        return self.replace(pool=self.pool.replace(keys=tuple(keys), values=tuple(values)))

    def read(
        self, layer: int
    ) -> tuple[Float[Array, "B S G C"], Float[Array, "B S G C"], Int[Array, "B S"]]:
        b, width = self.block_tables.shape
        bs = self.block_size

        def gather(pool):
            blocks = from_storage(pool[self.block_tables], self.pool.dtype)  # (B, W, BS, G, C)
            return blocks.reshape(b, width * bs, *pool.shape[2:])

        slot_positions = jnp.broadcast_to(jnp.arange(width * bs, dtype=jnp.int32), (b, width * bs))
        return gather(self.pool.keys[layer]), gather(self.pool.values[layer]), slot_positions

    def attend(
        self,
        layer: int,
        q: Float[Array, "B T H C"],
        positions: Int[Array, "B T"],
        token_mask: Bool[Array, "B T"],
    ) -> Float[Array, "B T H C"]:
        if self.attention == AttentionPath.KERNEL:
            limits = jnp.where(token_mask, positions + 1, 0)
            return paged_attention(
                q, self.pool.keys[layer], self.pool.values[layer], self.block_tables, limits
            )
        k, v, key_positions = self.read(layer)
        return attend_positions(q, k, v, key_positions, positions)
