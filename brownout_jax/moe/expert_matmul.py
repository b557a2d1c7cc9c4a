"""Routed-expert FFNs over expert-sorted row tiles, and the dense per-expert reference.

``apply_experts_sorted`` is the CPU path: assignments (token, expert) are sorted by expert and
padded to whole tiles of ``block_rows`` rows, every tile belongs to exactly one expert, and a
loop with a *dynamic* trip count visits only the tiles that exist. Its cost therefore follows
the number of non-empty experts (plus rows), not the number of experts — the property brownout
exploits, since it shrinks the set of distinct experts a step touches. ``jax.lax.ragged_dot``
does not have this property on CPU or GPU (it is expanded to groups × a dense matmul).

``apply_experts_dense`` runs every expert on every token: slow, obviously correct, the twin
the fast path is tested against.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.params import ExpertWeights
from brownout_jax.moe.routing import sort_by_expert


@dataclasses.dataclass(frozen=True, slots=True)
class ExpertTiling:
    """Rows per tile of the expert-sorted assignment matrix."""

    block_rows: int

    def __post_init__(self) -> None:
        if self.block_rows <= 0:
            raise ValueError(f"block_rows must be positive, got {self.block_rows}")


# Bounds of the tile height. A tile re-reads its expert's weights, so a tile should hold all of
# a typical expert's rows; rows past an expert's count are padding, computed and discarded.
MIN_TILING = ExpertTiling(block_rows=8)
MAX_TILING = ExpertTiling(block_rows=128)


def tiling_for(num_assignments: int, active_experts: int) -> ExpertTiling:
    """Tile height from the static step shape: the next power of two of the rows an active
    expert gets on average, within [MIN_TILING, MAX_TILING]."""
    rows = -(-num_assignments // max(active_experts, 1))
    block = MIN_TILING.block_rows
    while block < min(rows, MAX_TILING.block_rows):
        block *= 2
    return ExpertTiling(block)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SortedTiles:
    """Where every assignment lives in the expert-sorted, tile-padded row matrix."""

    row_token: Int[Array, " P"]  # token feeding each padded row (N = empty row)
    assignment_row: Int[Array, " A"]  # padded row of each (token, k) assignment (P = dropped)
    tile_expert: Int[Array, " tiles"]  # expert of each tile
    num_tiles: Int[Array, ""]  # tiles actually in use (the rest are never visited)
    active_experts: Int[Array, " E"]  # experts with rows first (in id order), then the rest
    num_active: Int[Array, ""]
    first_tile: Int[Array, " E"]  # first tile of each expert
    tiles_per_expert: Int[Array, " E"]


def sort_into_tiles(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], num_experts: int, block_rows: int
) -> SortedTiles:
    """Groups assignments by expert into tiles; masked tokens (and the sentinel) get no row."""
    n, k = expert_ids.shape
    a = n * k
    bm = block_rows
    grouped = sort_by_expert(expert_ids, token_mask, num_experts)
    order, sorted_expert, counts = grouped.order, grouped.sorted_expert, grouped.counts
    tiles_per_expert = (counts + bm - 1) // bm
    tile_end = jnp.cumsum(tiles_per_expert)
    first_tile = tile_end - tiles_per_expert
    first_sorted = jnp.cumsum(counts) - counts
    real = sorted_expert < num_experts
    safe_expert = jnp.minimum(sorted_expert, num_experts - 1)
    rank = jnp.arange(a, dtype=jnp.int32) - first_sorted[safe_expert]
    max_tiles = -(-a // bm) + min(num_experts, a)
    p = max_tiles * bm
    sorted_row = jnp.where(real, first_tile[safe_expert] * bm + rank, p)
    row_token = jnp.full((p,), n, jnp.int32).at[sorted_row].set(order // k, mode="drop")
    assignment_row = jnp.zeros((a,), jnp.int32).at[order].set(sorted_row)
    tile_expert = jnp.searchsorted(tile_end, jnp.arange(max_tiles), side="right")
    return SortedTiles(
        row_token=row_token,
        assignment_row=assignment_row,
        tile_expert=jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32),
        num_tiles=tile_end[-1],
        active_experts=jnp.argsort(counts == 0, stable=True).astype(jnp.int32),
        num_active=jnp.sum(counts > 0),
        first_tile=first_tile,
        tiles_per_expert=tiles_per_expert,
    )


def _swiglu_tile(
    x: Float[Array, "M D"],
    w_gate: Float[Array, "D F"],
    w_up: Float[Array, "D F"],
    w_down: Float[Array, "F D"],
) -> Float[Array, "M D"]:
    gate = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    hidden = (jax.nn.silu(gate) * up).astype(x.dtype)
    return jnp.dot(hidden, w_down, preferred_element_type=jnp.float32)


def apply_experts_sorted(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    tiling: ExpertTiling | None = None,
) -> Float[Array, "N D"]:
    """Σ_k weight[n, k] · FFN_{expert[n, k]}(x[n]), visiting only tiles of non-empty experts."""
    n, k = expert_ids.shape
    d = x.shape[-1]
    e = experts.num_experts
    tiling = tiling or tiling_for(n * k, e)
    bm = tiling.block_rows
    tiles = sort_into_tiles(expert_ids, token_mask, e, bm)
    x_rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[tiles.row_token]
    p = x_rows.shape[0]

    def expert_body(j, y_rows):
        ex = tiles.active_experts[j]
        # One weight slice per active expert, shared by all its tiles: XLA:CPU materialises
        # dynamic slices, so slicing per tile would re-copy a busy expert's weights.
        w_gate, w_up, w_down = experts.w_gate[ex], experts.w_up[ex], experts.w_down[ex]

        def tile_body(i, y_rows):
            row = (tiles.first_tile[ex] + i) * bm
            x_tile = jax.lax.dynamic_slice_in_dim(x_rows, row, bm)
            y_tile = _swiglu_tile(x_tile, w_gate, w_up, w_down)
            return jax.lax.dynamic_update_slice_in_dim(y_rows, y_tile, row, axis=0)

        return jax.lax.fori_loop(0, tiles.tiles_per_expert[ex], tile_body, y_rows)

    y_rows = jax.lax.fori_loop(0, tiles.num_active, expert_body, jnp.zeros((p, d), jnp.float32))
    # Gather each assignment's row and sum over k: deterministic, no scatter-add.
    y_rows = jnp.concatenate([y_rows, jnp.zeros((1, d), jnp.float32)])
    y_assign = y_rows[tiles.assignment_row].reshape(n, k, d)
    weights = jnp.where(token_mask[:, None], expert_weights.astype(jnp.float32), 0.0)
    return jnp.einsum("nkd,nk->nd", y_assign, weights).astype(x.dtype)


def apply_experts_dense(
    x: Float[Array, "N D"],
    expert_ids: Int[Array, "N K"],
    expert_weights: Float[Array, "N K"],
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
) -> Float[Array, "N D"]:
    """Reference: every expert on every token, weighted by its (possibly zero) routing weight."""
    e = experts.num_experts
    one_hot = jax.nn.one_hot(expert_ids, e, dtype=jnp.float32)  # N K E
    weight = jnp.einsum("nke,nk->ne", one_hot, expert_weights.astype(jnp.float32))
    weight = jnp.where(token_mask[:, None], weight, 0.0)

    def one_expert(acc, inputs):
        w_gate, w_up, w_down, w_e = inputs
        return acc + w_e[:, None] * _swiglu_tile(x, w_gate, w_up, w_down), None

    out, _ = jax.lax.scan(
        one_expert,
        jnp.zeros(x.shape, jnp.float32),
        (experts.w_gate, experts.w_up, experts.w_down, weight.T),
    )
    return out.astype(x.dtype)
