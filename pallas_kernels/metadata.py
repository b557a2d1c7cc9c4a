"""Tile metadata of a grouped matmul, computed in XLA before the kernel runs.

Rows of x are sorted by group: group i owns rows [start_i, end_i). Each group is cut into
``ceil(size_i / bm)`` tiles of bm rows (none for an empty group), so every tile belongs to
exactly one group and every row to exactly one tile; the last tile of a group is partial and
its rows past ``end_i`` are masked in the kernel. Tiles are numbered group after group.

The kernel grid is static: ``max_tiles(m, g, bm) = cdiv(m, bm) + min(g, m)`` bounds the number
of tiles of any split of m rows into g groups (each non-empty group wastes less than one
tile), and programs whose tile index is ≥ ``num_tiles`` exit after one scalar load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def max_tiles(m: int, num_groups: int, bm: int) -> int:
    """Static bound on the tiles of m rows split into ``num_groups`` groups."""
    return cdiv(m, bm) + min(num_groups, m)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroupMetadata:
    """Where every tile of the grouped matmul lives (int32 throughout)."""

    num_tiles: Int[Array, " 1"]  # tiles in use; the grid's other programs do nothing
    tile_group: Int[Array, " T"]  # group of each tile (dead tiles: clamped, never read)
    tile_first_row: Int[Array, " T"]  # first row of each tile
    group_end: Int[Array, " G"]  # one past the last row of each group


def group_metadata(group_sizes: Int[Array, " G"], m: int, bm: int) -> GroupMetadata:
    """Tiles of ``bm`` rows per group. Group ends are clamped to m, so sizes summing past m can
    never make the kernel touch rows that do not exist."""
    g = group_sizes.shape[0]
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    group_end = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
    group_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), group_end[:-1]])
    tiles = (group_end - group_start + bm - 1) // bm
    tile_end = jnp.cumsum(tiles)
    tile_start = tile_end - tiles
    t = jnp.arange(max_tiles(m, g, bm), dtype=jnp.int32)
    # First group whose tiles end after t; empty groups (tile_end equal to the previous) are
    # skipped by side="right".
    tile_group = jnp.searchsorted(tile_end, t, side="right").astype(jnp.int32)
    tile_group = jnp.minimum(tile_group, g - 1)
    tile_first_row = group_start[tile_group] + (t - tile_start[tile_group]) * bm
    return GroupMetadata(
        num_tiles=tile_end[-1:].astype(jnp.int32),
        tile_group=tile_group,
        tile_first_row=tile_first_row.astype(jnp.int32),
        group_end=group_end,
    )
