"""Expert parallelism: routed and united experts sharded over a mesh axis ``expert``.

Layout. Each MoE layer's stacked experts, E originals then U united (``united.attach_united``),
become one (n, a + b, …) array for a mesh of n devices, a = ⌈E/n⌉ and b = ⌈U/n⌉: device d holds
originals [d·a, (d+1)·a) then united [d·b, (d+1)·b), each run padded with zero-weight experts.
Originals and united are padded separately so every device holds a share of both (padding the
stacked E + U as one run would put every united expert on the last devices, which would then
carry the whole browned-out load). The leading device axis makes the layout self-describing: a
mesh of another size, or a model step without the mesh, fails at trace time instead of routing
to the wrong experts.

Routing stays in logical ids. The router keeps its E columns (so padding experts can never be
chosen) and ``group_of_expert`` its E entries: brownout rewrites cold expert e to E + group(e)
exactly as on one device; only the expert FFNs map a logical id to (device, local slot).

Tokens are replicated (attention, embeddings, router and shared expert are replicated), so
every device routes the whole batch itself: the brownout hot set comes from global counts with
no collective, and routing is identical to the single-device model at every threshold. Inside
``shard_map`` each device runs the ordinary expert path on its local experts only
(assignments owned elsewhere get the local sentinel id, which every backend drops), so its cost
follows its own distinct experts; one psum of the (N, D) partial outputs combines them. The
choice and its bytes are in docs/ARCHITECTURE.md, "Expert parallelism".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.params import ExpertWeights, ModelParams, MoeParams
from brownout_jax.moe.brownout import route
from brownout_jax.moe.expert_matmul import tiling_for
from brownout_jax.moe.experts import apply_routed_experts, expected_active_experts
from brownout_jax.moe.mesh_config import AXIS, MeshConfig
from brownout_jax.moe.options import MoeOptions
from brownout_jax.moe.routing import RouterOutput


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """The mesh over all of JAX's devices (every process's, after jax.distributed.initialize);
    their number must equal the mesh size."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != config.num_devices:
        kind = devices[0].platform if devices else "none"
        raise ValueError(
            f"mesh {config} needs {config.num_devices} devices, but JAX sees {len(devices)} "
            f"({kind}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{config.num_devices} before JAX starts, on GPUs choose them with "
            "CUDA_VISIBLE_DEVICES"
        )
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True, slots=True)
class ExpertLayout:
    """Where logical expert ids live: original e on device e // a at slot e % a; united
    expert g (logical id E + g) on device g // b at slot a + g % b."""

    num_experts: int  # E, routed originals
    num_shards: int  # n, devices on the expert axis
    originals_per_shard: int  # a = ⌈E/n⌉
    united_per_shard: int  # b = ⌈U/n⌉

    @classmethod
    def for_counts(cls, num_experts: int, num_united: int, num_shards: int) -> ExpertLayout:
        if num_shards > num_experts:
            raise ValueError(
                f"mesh {AXIS}={num_shards} exceeds the {num_experts} routed experts: some "
                "devices would hold only padding; use at most as many devices as experts"
            )
        return cls(
            num_experts,
            num_shards,
            math.ceil(num_experts / num_shards),
            math.ceil(num_united / num_shards),
        )

    @classmethod
    def of(cls, moe: MoeParams, mesh: Mesh) -> ExpertLayout:
        """The layout of params placed by :func:`shard_params`, checked against ``mesh``."""
        shape = moe.experts.w_gate.shape
        n = mesh.shape[AXIS]
        if len(shape) != 4:
            raise ValueError(
                f"expert weights of shape {tuple(shape)} are not laid out for expert "
                "parallelism: place the params with expert_parallel.shard_params(params, "
                "config, mesh) first"
            )
        if shape[0] != n:
            raise ValueError(
                f"expert weights are laid out for {AXIS}={shape[0]}, the mesh has {AXIS}={n}"
            )
        e = moe.router.shape[1]
        a = math.ceil(e / n)
        return cls(e, n, a, shape[1] - a)

    @property
    def slots_per_shard(self) -> int:
        return self.originals_per_shard + self.united_per_shard

    @property
    def padded_united(self) -> int:
        return self.united_per_shard * self.num_shards

    def locate(self, ids: Int[Array, "N K"]) -> tuple[Int[Array, "N K"], Int[Array, "N K"]]:
        """(device, local slot) of every logical expert id."""
        a, b = self.originals_per_shard, max(self.united_per_shard, 1)
        united = ids >= self.num_experts
        g = ids - self.num_experts
        shard = jnp.where(united, g // b, ids // a)
        slot = jnp.where(united, a + g % b, ids % a)
        return shard.astype(jnp.int32), slot.astype(jnp.int32)


def _replicate_leaf(x, sharding: NamedSharding) -> jax.Array:
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return replicate_across_processes(x, sharding)


def replicate_across_processes(x, sharding: NamedSharding) -> jax.Array:
    """``x`` replicated with ``sharding``, every process supplying its own (identical) copy to
    its own devices. Not ``device_put``: across processes it first checks that every process
    passed the same value, a gather and a host sync over every process (jax 0.10.2)."""
    shape = np.shape(x)
    arrays = [jax.device_put(x, d) for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` replicated on every device of ``mesh``."""
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: _replicate_leaf(x, sharding), tree)


def _shard_experts(w: Array, layout: ExpertLayout, num_united: int, mesh: Mesh) -> jax.Array:
    """(E + U, …) → (n, a + b, …) sharded on the expert axis, one device's block at a time
    (no full padded copy ever exists on one device)."""
    e, a, b = layout.num_experts, layout.originals_per_shard, layout.united_per_shard
    rest = w.shape[1:]
    shape = (layout.num_shards, a + b, *rest)
    sharding = NamedSharding(mesh, P(AXIS))

    def block(d: int) -> Array:
        def run(start: int, stop: int, size: int) -> list:
            part = w[start:stop]  # empty when this device's run is all padding
            pad = size - part.shape[0]
            return [part, jnp.zeros((pad, *rest), w.dtype)] if pad else [part]

        originals = run(min(d * a, e), min((d + 1) * a, e), a)
        united = run(e + min(d * b, num_united), e + min((d + 1) * b, num_united), b)
        return jnp.concatenate(originals + united)[None]

    index_map = sharding.addressable_devices_indices_map(shape)
    arrays = [
        jax.device_put(block(index[0].indices(shape[0])[0]), device)
        for device, index in index_map.items()
    ]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def is_expert_parallel(params: ModelParams) -> bool:
    return any(
        isinstance(layer.mlp, MoeParams) and len(layer.mlp.experts.w_gate.shape) == 4
        for layer in params.layers
    )


def shard_params(params: ModelParams, config: ModelConfig, mesh: Mesh) -> ModelParams:
    """Routed + united experts sharded on the expert axis in the padded layout (stacks packed
    for the CPU kernels are unpacked first: the shards are stored-layout stacks); every other
    parameter (attention, embeddings, router, shared expert) replicated."""
    if is_expert_parallel(params):
        raise ValueError("params are already laid out for expert parallelism")
    n = mesh.shape[AXIS]
    layers = list(params.layers)
    sharded: dict[int, ExpertWeights] = {}
    for i in config.moe_layers:
        moe = layers[i].mlp
        assert isinstance(moe, MoeParams)
        layout = ExpertLayout.for_counts(moe.router.shape[1], moe.num_united, n)
        sharded[i] = jax.tree_util.tree_map(
            lambda w, u=moe.num_united, layout=layout: _shard_experts(w, layout, u, mesh),
            moe.experts.unpacked(),
        )
        layers[i] = layers[i].replace(mlp=moe.replace(experts=None))
    placed = replicate(params.replace(layers=tuple(layers)), mesh)
    layers = list(placed.layers)
    for i, experts in sharded.items():
        layers[i] = layers[i].replace(mlp=layers[i].mlp.replace(experts=experts))
    return placed.replace(layers=tuple(layers))


def expert_parallel_setup(
    params: ModelParams,
    config: ModelConfig,
    mesh_config: MeshConfig | None,
    options: tuple[MoeOptions, ...],
) -> tuple[ModelParams, tuple[MoeOptions, ...]]:
    """For offline generation: params placed on the mesh and step options that use it; with
    no mesh config, both unchanged."""
    if mesh_config is None:
        return params, options
    mesh = make_mesh(mesh_config)
    placed = shard_params(params, config, mesh)
    return placed, tuple(dataclasses.replace(o, mesh=mesh) for o in options)


def abstract_placed(tree):
    """ShapeDtypeStructs that keep each array's sharding (for AOT lowering on a mesh)."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree
    )


def apply_experts_parallel(
    x: Float[Array, "N D"],
    routing: RouterOutput,
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    options: MoeOptions,
    layout: ExpertLayout,
) -> Float[Array, "N D"]:
    """Routed experts over the mesh: each device computes the assignments of its own experts
    (all tokens are on every device), one psum combines the partial outputs."""
    mesh = options.mesh
    total = layout.num_experts + layout.padded_united
    tiling = options.tiling or tiling_for(
        routing.expert_ids.size, expected_active_experts(total, layout.padded_united, options)
    )
    local_options = dataclasses.replace(options, mesh=None, tiling=tiling)
    sentinel = layout.slots_per_shard  # an id every backend gives no row

    def per_device(x, ids, weights, mask, local: ExpertWeights):
        local = jax.tree_util.tree_map(lambda w: w[0], local)
        shard, slot = layout.locate(ids)
        mine = shard == jax.lax.axis_index(AXIS)
        local_routing = RouterOutput(
            expert_ids=jnp.where(mine, slot, sentinel),
            expert_weights=jnp.where(mine, weights, jnp.zeros_like(weights)),
            router_probs=None,
        )
        out = apply_routed_experts(
            x, local_routing, local, mask, local_options, layout.united_per_shard
        )
        return jax.lax.psum(out, AXIS)

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(), P(), P(), P(AXIS)),
        out_specs=P(),
        # The expert path's loops start from fresh zeros (device-invariant) and return
        # per-device values; the varying-axis type check would reject that carry.
        check_vma=False,
    )(x, routing.expert_ids, routing.expert_weights, token_mask, experts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, slots=True)
class DeviceLoad:
    """One step's work per device of the expert axis (one MoE layer)."""

    assignments: Int[Array, " DEV"]  # (token, expert) rows it computes
    tokens: Int[Array, " DEV"]  # real tokens with at least one assignment there
    experts: Int[Array, " DEV"]  # distinct experts (originals + united) it runs


def expert_load_per_device(
    expert_ids: Int[Array, "N K"], token_mask: Bool[Array, " N"], layout: ExpertLayout
) -> DeviceLoad:
    """Per-device load of routed (brownout-rewritten) logical expert ids."""
    n, s = layout.num_shards, layout.slots_per_shard
    shard, slot = layout.locate(expert_ids)
    here = (shard[..., None] == jnp.arange(n)) & token_mask[:, None, None]  # N K DEV
    physical = jnp.where(token_mask[:, None], shard * s + slot, n * s).reshape(-1)
    used = jnp.zeros(n * s + 1, bool).at[physical].set(True)[: n * s].reshape(n, s)
    return DeviceLoad(
        assignments=jnp.sum(here, axis=(0, 1)),
        tokens=jnp.sum(jnp.any(here, axis=1), axis=0),
        experts=jnp.sum(used, axis=1),
    )


def routed_load(
    x: Float[Array, "N D"],
    moe: MoeParams,
    token_mask: Bool[Array, " N"],
    top_k: int,
    norm_topk_prob: bool,
    threshold: float,
    num_devices: int,
) -> DeviceLoad:
    """Routes a batch through one MoE layer (single-device layout) with brownout at
    ``threshold`` and returns what each of ``num_devices`` devices would compute."""
    routing = route(x, moe, token_mask, top_k, norm_topk_prob, threshold, moe.num_united)
    layout = ExpertLayout.for_counts(moe.router.shape[1], moe.num_united, num_devices)
    return expert_load_per_device(routing.expert_ids, token_mask, layout)
