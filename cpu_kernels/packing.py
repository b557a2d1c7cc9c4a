"""The packed weight layout of the CPU matmul kernels, and how weights get into it.

A (K, N) bfloat16 weight is stored as ``packed[b, p, 2c + j] = w[2p + j, 32b + c]``, shape
``(NB, KP, 64)`` with NB = ⌈N / 32⌉ and KP = ⌈K / 32⌉ · 16, zeros past K and N. Why this
layout (csrc/packed_linear.h has the details):

* every 32-column block is one contiguous run (KP · 128 bytes), so a decode-sized matmul reads
  its weights front to back — the stored (K, N) layout reads 64–128 bytes per row with a
  row-sized stride, which defeats the prefetchers (a Qwen LM head row is 303 KB);
* each 32-bit lane holds a depth pair (w[2p, c], w[2p+1, c]): the operand of AVX-512-BF16's
  vdpbf16ps as loaded, and 16 consecutive pairs of a half block are an AMX-BF16 B tile in its
  VNNI form (128-byte stride), so neither path shuffles weights at run time;
* 32 columns (two 16-column AMX tiles, two zmm of pairs) is the widest block both use whole;
  K padded to 32 is one AMX tile depth, so no path has a depth tail.

SGLang's and vLLM's CPU kernels use the same family of layouts (K in pairs, N in 16/32-column
blocks). Checkpoints on disk keep (K, N); weights are packed once, after loading, and the
original is dropped (no second copy); ``unpack`` restores (K, N) exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

BLOCK_COLS = 32
DEPTH_ALIGN = 32


class MatmulPath(enum.Enum):
    """Which implementation runs a packed weight's matmul at some row count."""

    KERNEL = "kernel"  # cpu_kernels.packed_linear
    XLA = "xla"  # XLA's dot on the packed layout (packed_linear_xla)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["k", "n", "paths"]
)
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A (k, n) weight in the packed layout. ``paths`` is the measured choice of
    implementation by row count: ``((rows, path), …)`` by ascending rows — a matmul of M rows
    takes the path of the first entry with rows ≥ M (past the last: the last's); empty means
    the kernel everywhere. Static (part of the tree structure): a jitted step is compiled for
    one choice."""

    data: Float[Array, "NB KP 64"]
    k: int
    n: int
    paths: tuple[tuple[int, MatmulPath], ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.k, self.n)

    @property
    def dtype(self):
        return self.data.dtype

    def path_for(self, rows: int) -> MatmulPath:
        for bound, path in self.paths:
            if rows <= bound:
                return path
        return self.paths[-1][1] if self.paths else MatmulPath.KERNEL

    def with_paths(self, paths) -> PackedWeight:
        return dataclasses.replace(self, paths=tuple(paths))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["data"], meta_fields=["k", "n"])
@dataclasses.dataclass(frozen=True)
class PackedStack:
    """A stack of G (k, n) weights (routed experts), each packed: data (G, NB, KP, 64)."""

    data: Float[Array, "G NB KP 64"]
    k: int
    n: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data.shape[0], self.k, self.n)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self):
        return self.data.dtype


def packed_dims(k: int, n: int) -> tuple[int, int]:
    """(NB, KP) of a (k, n) weight."""
    return -(-n // BLOCK_COLS), -(-k // DEPTH_ALIGN) * (DEPTH_ALIGN // 2)


def _pack(w):
    k, n = w.shape
    blocks, kp = packed_dims(k, n)
    w = jnp.pad(w, ((0, 2 * kp - k), (0, blocks * BLOCK_COLS - n)))
    return w.reshape(kp, 2, blocks, BLOCK_COLS).transpose(2, 0, 3, 1).reshape(blocks, kp, 64)


def _unpack(data, k: int, n: int):
    blocks, kp, _ = data.shape
    w = data.reshape(blocks, kp, BLOCK_COLS, 2).transpose(1, 3, 0, 2)
    return w.reshape(2 * kp, blocks * BLOCK_COLS)[:k, :n]


_pack_jit = jax.jit(_pack)
# Weights up to this size are packed by NumPy on the host: no compilation per shape (a
# model's small dense shapes each cost a compile of ~0.2 s at start-up, 1.7 s for the demo);
# larger ones by one fused XLA pass on both cores.
HOST_PACK_BYTES = 64 << 20


def _pack_host(w: np.ndarray) -> np.ndarray:
    """``_pack`` in NumPy, over the last two axes (a stack packs each matrix)."""
    *lead, k, n = w.shape
    blocks, kp = packed_dims(k, n)
    if (2 * kp, blocks * BLOCK_COLS) != (k, n):
        pad = [(0, 0)] * len(lead) + [(0, 2 * kp - k), (0, blocks * BLOCK_COLS - n)]
        w = np.pad(w, pad)
    w = w.reshape(*lead, kp, 2, blocks, BLOCK_COLS)
    axes = tuple(range(len(lead)))
    w = w.transpose(*axes, len(lead) + 2, len(lead), len(lead) + 3, len(lead) + 1)
    return np.ascontiguousarray(w).reshape(*lead, blocks, kp, 64)


def _on_host(w) -> bool:
    """A concrete array small enough for ``_pack_host`` (never a tracer)."""
    if isinstance(w, jax.core.Tracer) or not isinstance(w, (np.ndarray, jax.Array)):
        return False
    return w.size * w.dtype.itemsize <= HOST_PACK_BYTES


def pack(w: Float[Array, "K N"]) -> PackedWeight:
    """The packed form of a bfloat16 (K, N) weight (one fused pass: the only transient is the
    output). Traceable: ``jax.eval_shape(pack, spec)`` gives the packed shapes."""
    if w.ndim != 2:
        raise ValueError(f"pack: w must be (K, N), got shape {w.shape}")
    if jnp.dtype(w.dtype) != jnp.bfloat16:
        raise ValueError(f"pack: the packed kernels read bfloat16 weights, got {w.dtype}")
    k, n = w.shape
    if _on_host(w):
        return PackedWeight(jnp.asarray(_pack_host(np.asarray(w))), k, n)
    return PackedWeight(_pack_jit(w), k, n)


_pack_stack_jit = jax.jit(jax.vmap(_pack))


def pack_stack(w: Float[Array, "G K N"]) -> PackedStack:
    """Each (K, N) matrix of a bfloat16 (G, K, N) stack packed (traceable, like ``pack``)."""
    if w.ndim != 3:
        raise ValueError(f"pack_stack: w must be (G, K, N), got shape {w.shape}")
    if jnp.dtype(w.dtype) != jnp.bfloat16:
        raise ValueError(f"pack_stack: the packed kernels read bfloat16 weights, got {w.dtype}")
    if _on_host(w):
        return PackedStack(jnp.asarray(_pack_host(np.asarray(w))), w.shape[1], w.shape[2])
    return PackedStack(_pack_stack_jit(w), w.shape[1], w.shape[2])


def unpack_stack(packed: PackedStack) -> Float[Array, "G K N"]:
    """The (G, K, N) stack back, bit for bit."""
    return jax.vmap(lambda d: _unpack(d, packed.k, packed.n))(packed.data)


def unpack(packed: PackedWeight) -> Float[Array, "K N"]:
    """The (K, N) weight back, bit for bit."""
    return _unpack(packed.data, packed.k, packed.n)


def packed_linear_xla(x: Float[Array, "M K"], packed: PackedWeight) -> Float[Array, "M N"]:
    """XLA's dot on the packed layout (contracting the depth pairs in place), float32 out:
    the other path of the per-shape choice, measured on the layout the weight really has."""
    blocks, kp, _ = packed.data.shape
    m, k = x.shape
    x = jnp.pad(x, ((0, 0), (0, 2 * kp - k))).reshape(m, kp, 2)
    w = packed.data.reshape(blocks, kp, BLOCK_COLS, 2)
    y = jnp.einsum("mpj,bpcj->mbc", x, w, preferred_element_type=jnp.float32)
    return y.reshape(m, blocks * BLOCK_COLS)[:, : packed.n]
