"""Kernel bodies of the grouped matmuls and the one ``pallas_call`` that launches them.

One program computes one (bm, bn) output block: ``program_id(0)`` is a tile (bm rows of one
group, see ``metadata.py``), ``program_id(1)`` a block of bn output columns. The body:

1. ``tile < num_tiles`` or exit (the grid is a static bound; dead programs do one scalar load);
2. scalar loads of the tile's group, first row and the group's end row;
3. a ``fori_loop`` over k // bk contraction blocks: a masked load of the x tile (rows past the
   group's end read as zero, rows past the array's end are never read), one weight block per
   projection from ``w[group]`` read in place, fp32 accumulation;
4. the epilogue in fp32 (identity, SiLU(gate)·up, or × routing weight of each row);
5. one masked store of the rows that belong to the group. Tiles never overlap, so every output
   row is written at most once and there is no read-modify-write of the output.

Rows past sum(group_sizes) belong to no tile. The output buffer is a zeros input aliased to
the output (``input_output_aliases``), so those rows are zero: XLA writes the zeros with a
memset (write-only, m·n elements), which is cheaper than masking them after the kernel (a
read and a write of the whole output) and keeps the kernel free of "padding" tiles.

Triton lowering (``jax.experimental.pallas.triton``): explicit ``CompilerParams`` (newer jax
would otherwise pick Mosaic GPU), no scalar prefetch and no dynamic grid, so the metadata
arrays are ordinary whole-array inputs read with scalar loads; every loaded block has power-of-
two dimensions. In interpret mode the same body runs on any backend.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.metadata import GroupMetadata
from pallas_kernels.tiling import KernelTiling

# (accumulators, row weights or None) -> fp32 output block
Epilogue = Callable[[Sequence[jax.Array], jax.Array | None], jax.Array]


def identity_epilogue(accs: Sequence[jax.Array], row_weights: jax.Array | None) -> jax.Array:
    (acc,) = accs
    return acc


def swiglu_epilogue(accs: Sequence[jax.Array], row_weights: jax.Array | None) -> jax.Array:
    gate, up = accs
    return gate * jax.nn.sigmoid(gate) * up  # SiLU(gate) · up, in fp32


def row_scale_epilogue(accs: Sequence[jax.Array], row_weights: jax.Array | None) -> jax.Array:
    (acc,) = accs
    assert row_weights is not None
    return acc * row_weights[:, None]


def _dot_precision(dtype) -> jax.lax.Precision:
    # fp32 inputs: full fp32 products (Triton "ieee"), not TF32; bf16/fp16: the native MMA.
    if jnp.dtype(dtype) == jnp.float32:
        return jax.lax.Precision.HIGHEST
    return jax.lax.Precision.DEFAULT


def _grouped_kernel(
    num_tiles_ref,
    tile_group_ref,
    tile_first_row_ref,
    group_end_ref,
    x_ref,
    *refs,
    tiling: KernelTiling,
    num_weights: int,
    has_row_weights: bool,
    epilogue: Epilogue,
):
    w_refs = refs[:num_weights]
    row_weights_ref = refs[num_weights] if has_row_weights else None
    o_ref = refs[-1]  # refs[-2] is the aliased zeros input: the same buffer, never read
    bm, bn, bk = tiling.bm, tiling.bn, tiling.bk
    k = x_ref.shape[1]
    # Program ids are read outside pl.when: interpret mode evaluates them only at top level.
    tile = pl.program_id(0)
    col0 = pl.multiple_of(pl.program_id(1) * bn, bn)

    @pl.when(tile < num_tiles_ref[0])
    def _():
        group = tile_group_ref[tile]
        row0 = tile_first_row_ref[tile]
        rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0)
        row_ok = rows < group_end_ref[group]
        x_mask = jnp.broadcast_to(row_ok[:, None], (bm, bk))
        precision = _dot_precision(x_ref.dtype)

        def k_step(kb, accs):
            k0 = pl.multiple_of(kb * bk, bk)
            x = plgpu.load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], mask=x_mask, other=0.0)
            return tuple(
                acc
                + jnp.dot(
                    x,
                    plgpu.load(w_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)]),
                    preferred_element_type=jnp.float32,
                    precision=precision,
                )
                for acc, w_ref in zip(accs, w_refs, strict=True)
            )

        zeros = tuple(jnp.zeros((bm, bn), jnp.float32) for _ in w_refs)
        accs = jax.lax.fori_loop(0, k // bk, k_step, zeros)
        row_weights = None
        if row_weights_ref is not None:
            row_weights = plgpu.load(
                row_weights_ref.at[pl.ds(row0, bm)], mask=row_ok, other=0.0
            ).astype(jnp.float32)
        out = epilogue(accs, row_weights)
        plgpu.store(
            o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)],
            out.astype(o_ref.dtype),
            mask=jnp.broadcast_to(row_ok[:, None], (bm, bn)),
        )


def grouped_call(
    x: jax.Array,
    weights: Sequence[jax.Array],
    meta: GroupMetadata,
    *,
    tiling: KernelTiling,
    epilogue: Epilogue,
    out_dtype,
    row_weights: jax.Array | None,
    interpret: bool,
) -> jax.Array:
    """Launches the grouped kernel: out[r] = epilogue(x[r] @ w[group(r)] for w in weights).
    Shapes are validated by the caller (``api.py``)."""
    m = x.shape[0]
    n = weights[0].shape[2]
    grid = (meta.tile_group.shape[0], n // tiling.bn)
    kernel = functools.partial(
        _grouped_kernel,
        tiling=tiling,
        num_weights=len(weights),
        has_row_weights=row_weights is not None,
        epilogue=epilogue,
    )
    inputs = [meta.num_tiles, meta.tile_group, meta.tile_first_row, meta.group_end, x]
    inputs += list(weights)
    if row_weights is not None:
        inputs.append(row_weights)
    inputs.append(jnp.zeros((m, n), out_dtype))  # aliased to the output: rows of no tile stay 0
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=grid,
        input_output_aliases={len(inputs) - 1: 0},
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps, num_stages=tiling.num_stages
        ),
        interpret=interpret,
        name=f"grouped_{epilogue.__name__.removesuffix('_epilogue')}",
    )(*inputs)
