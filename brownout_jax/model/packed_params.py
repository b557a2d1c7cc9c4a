"""The weights in the CPU kernels' packed layout (``cpu_kernels.packing``), and which
implementation runs each dense (weight shape, row count).

On a CPU backend in bfloat16 with the kernel library built, weights are packed once after
loading and the originals dropped (``unpack_*`` restore them exactly):

* the dense weights — attention projections, dense and shared-expert MLPs, the LM head —
  become ``PackedWeight``s, as a :class:`DenseChoice` (measured by ``matmul_choice``) says per
  shape: whether to pack at all and, when packed, which path runs each row count. The choice
  travels in the weights (``PackedWeight.paths``, static), so the jitted steps need no global
  switch;
* the routed experts' stacks (originals and united) become ``PackedStack``s for the packed
  grouped kernel (``cpu_kernels.packed_grouped_swiglu``); other expert backends unpack them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from brownout_jax.cpu_kernels.packing import (
    MatmulPath,
    PackedStack,
    PackedWeight,
    pack,
    pack_stack,
    unpack,
)
from brownout_jax.model.params import (
    AttentionParams,
    DenseMlpParams,
    ExpertWeights,
    ModelParams,
    MoeParams,
)

Shape = tuple[int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class ShapeChoice:
    """For one (K, N) weight shape: packed or not, and by row count which path runs a packed
    one (``PackedWeight.paths``). Not packed: XLA's dot everywhere."""

    packed: bool
    paths: tuple[tuple[int, MatmulPath], ...] = ()


KERNEL_EVERYWHERE = ShapeChoice(packed=True)


@dataclasses.dataclass(frozen=True, slots=True)
class DenseChoice:
    """Per weight shape; shapes not listed take ``default``."""

    shapes: tuple[tuple[Shape, ShapeChoice], ...] = ()
    default: ShapeChoice = KERNEL_EVERYWHERE

    def of(self, shape: Shape) -> ShapeChoice:
        return dict(self.shapes).get(tuple(shape), self.default)


def packing_available() -> bool:
    """A CPU backend with the kernel library built (else the weights stay as loaded)."""
    if jax.default_backend() != "cpu":
        return False
    from brownout_jax.cpu_kernels import load_library

    return load_library().available


def _packable(w) -> bool:
    return (
        w is not None
        and not isinstance(w, PackedWeight)
        and len(w.shape) == 2
        and jnp.dtype(w.dtype) == jnp.bfloat16
    )


def _map_dense(params: ModelParams, fn) -> ModelParams:
    """``fn`` applied to every dense weight (None and other leaves untouched)."""

    def mlp(p: DenseMlpParams) -> DenseMlpParams:
        return p.replace(w_gate=fn(p.w_gate), w_up=fn(p.w_up), w_down=fn(p.w_down))

    layers = []
    for layer in params.layers:
        a: AttentionParams = layer.attention
        attention = a.replace(wq=fn(a.wq), wk=fn(a.wk), wv=fn(a.wv), wo=fn(a.wo))
        block = layer.mlp
        if isinstance(block, MoeParams):
            block = block.replace(shared=None if block.shared is None else mlp(block.shared))
        else:
            block = mlp(block)
        layers.append(layer.replace(attention=attention, mlp=block))
    lm_head = None if params.lm_head is None else fn(params.lm_head)
    return params.replace(layers=tuple(layers), lm_head=lm_head)


def dense_weight_shapes(params: ModelParams) -> tuple[Shape, ...]:
    """The distinct (K, N) shapes of the packable dense weights, sorted."""
    shapes = set()

    def note(w):
        if _packable(w):
            shapes.add(tuple(w.shape))
        return w

    _map_dense(params, note)
    return tuple(sorted(shapes))


def pack_dense_weights(
    params: ModelParams, choice: DenseChoice | None = None, consume: bool = False
) -> ModelParams:
    """Every bfloat16 dense weight whose shape ``choice`` packs, packed. With ``consume`` each
    original array is deleted as soon as its packed copy exists (the caller's ``params`` must
    not be used again), so packing costs one weight of transient memory, not a second copy
    of all of them. Works on arrays and, under ``jax.eval_shape``, on shapes alone."""
    choice = DenseChoice() if choice is None else choice

    def one(w):
        if not _packable(w):
            return w
        shape_choice = choice.of(tuple(w.shape))
        if not shape_choice.packed:
            return w
        packed = pack(w).with_paths(shape_choice.paths)
        if consume:
            jax.block_until_ready(packed.data)
            _delete(w)
        return packed

    return _map_dense(params, one)


def unpack_dense_weights(params: ModelParams) -> ModelParams:
    """Packed dense weights back to (K, N), bit for bit (export, training)."""
    return _map_dense(params, lambda w: unpack(w) if isinstance(w, PackedWeight) else w)


@dataclasses.dataclass(frozen=True, slots=True)
class DensePathEntry:
    """Matmuls with one (k, n) weight of up to ``max_rows`` rows (0: any number, or beyond the
    previous entry's) run ``path``."""

    k: int
    n: int
    packed: bool
    max_rows: int
    path: MatmulPath


def dense_paths(params: ModelParams) -> tuple[DensePathEntry, ...]:
    """The path every dense weight shape takes by row count, as the weights carry it (bf16
    weights left unpacked run XLA's dot; float32 ones the streaming kernel on CPU, listed as
    ``kernel``)."""
    found: dict[tuple[int, int], tuple[DensePathEntry, ...]] = {}

    def note(w):
        if w is None or len(w.shape) != 2 or tuple(w.shape) in found:
            return w
        k, n = w.shape
        if isinstance(w, PackedWeight):
            paths = w.paths or ((0, MatmulPath.KERNEL),)
            last = len(paths) - 1
            found[(k, n)] = tuple(
                DensePathEntry(k, n, True, 0 if i == last else rows, path)
                for i, (rows, path) in enumerate(paths)
            )
        else:
            bf16 = jnp.dtype(w.dtype) == jnp.bfloat16
            path = MatmulPath.XLA if bf16 or not packing_available() else MatmulPath.KERNEL
            found[(k, n)] = (DensePathEntry(k, n, False, 0, path),)
        return w

    _map_dense(params, note)
    return tuple(entry for shape in sorted(found) for entry in found[shape])


def packed_weight_count(params: ModelParams) -> int:
    count = 0

    def note(w):
        nonlocal count
        count += isinstance(w, PackedWeight)
        return w

    _map_dense(params, note)
    return count


def _delete(w) -> None:
    if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer):
        w.delete()


def pack_expert_weights(params: ModelParams, consume: bool = False) -> ModelParams:
    """Every MoE layer's bfloat16 expert stacks packed (``consume`` as in
    ``pack_dense_weights``: a stack's original is deleted once its packed copy exists)."""

    def stacks(experts: ExpertWeights) -> ExpertWeights:
        if experts.packed or jnp.dtype(experts.w_gate.dtype) != jnp.bfloat16:
            return experts
        out = []
        for w in (experts.w_gate, experts.w_up, experts.w_down):
            packed = pack_stack(w)
            if consume:
                jax.block_until_ready(packed.data)
                _delete(w)
            out.append(packed)
        return ExpertWeights(*out)

    layers = tuple(
        layer.replace(mlp=layer.mlp.replace(experts=stacks(layer.mlp.experts)))
        if isinstance(layer.mlp, MoeParams)
        else layer
        for layer in params.layers
    )
    return params.replace(layers=layers)


def unpack_expert_weights(params: ModelParams) -> ModelParams:
    layers = tuple(
        layer.replace(mlp=layer.mlp.replace(experts=layer.mlp.experts.unpacked()))
        if isinstance(layer.mlp, MoeParams)
        else layer
        for layer in params.layers
    )
    return params.replace(layers=layers)


def packed_stack_count(params: ModelParams) -> int:
    return sum(
        isinstance(layer.mlp, MoeParams) and isinstance(layer.mlp.experts.w_gate, PackedStack)
        for layer in params.layers
    )
