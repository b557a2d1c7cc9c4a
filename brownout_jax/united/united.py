"""United experts: one per group of ``way`` routed experts, with one expert's shape.

Groups are per MoE layer: ``contiguous`` (expert e in group e // way, as the paper) or
``similarity`` (experts whose outputs on calibration activations point the same way share a
group; groups balanced to at most ``way`` members). ``attach_united`` stacks the U united
experts after the E originals of each layer, so one grouped matmul serves both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from brownout_jax.cpu_kernels.packing import pack_stack
from brownout_jax.model.config import ModelConfig
from brownout_jax.model.dims import Array, Int
from brownout_jax.model.params import ExpertWeights, ModelParams, MoeParams

GROUPINGS = ("contiguous", "similarity")


@struct.dataclass
class UnitedLayer:
    experts: ExpertWeights  # (U, D, F) / (U, F, D)
    group_of_expert: Int[Array, " E"]


@struct.dataclass
class UnitedExperts:
    layers: tuple[UnitedLayer, ...]  # one per MoE layer, in ``config.moe_layers`` order


def num_groups(num_experts: int, way: int) -> int:
    return -(-num_experts // way)


def check_way(way: int, num_experts: int) -> None:
    if way < 1 or way & (way - 1):
        raise ValueError(f"way must be a power of two (1, 2, 4, 8, …), got {way}")
    if way > num_experts:
        raise ValueError(f"way ({way}) exceeds the number of experts ({num_experts})")


def contiguous_groups(num_experts: int, way: int) -> np.ndarray:
    """Expert e → group e // way; the last group may be short (60 experts, way 8)."""
    return (np.arange(num_experts) // way).astype(np.int32)


def similarity_groups(outputs: np.ndarray, way: int) -> np.ndarray:
    """Balanced greedy clustering by cosine similarity of expert outputs.

    ``outputs`` is (E, S, D): each expert's output on the same S calibration tokens. Taking
    seeds in id order, each group is the seed plus its ``way - 1`` most similar unassigned
    experts; deterministic, and the group count equals the contiguous one.
    """
    e = outputs.shape[0]
    flat = outputs.reshape(e, -1).astype(np.float64)
    flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    similarity = flat @ flat.T
    group = np.full(e, -1, np.int32)
    next_group = 0
    for seed in range(e):
        if group[seed] >= 0:
            continue
        free = np.flatnonzero(group < 0)
        free = free[free != seed]
        ranked = free[np.argsort(-similarity[seed, free], kind="stable")]
        members = [seed, *ranked[: way - 1].tolist()]
        group[members] = next_group
        next_group += 1
    return group


def members_of(group_of_expert: np.ndarray) -> list[list[int]]:
    groups: list[list[int]] = [[] for _ in range(int(group_of_expert.max()) + 1)]
    for expert, g in enumerate(group_of_expert.tolist()):
        groups[g].append(expert)
    return groups


def average_init(experts: ExpertWeights, group_of_expert: np.ndarray) -> ExpertWeights:
    """Each united expert starts as the parameter average of its members."""
    one_hot = jax.nn.one_hot(jnp.asarray(group_of_expert), int(group_of_expert.max()) + 1)
    share = (one_hot / jnp.sum(one_hot, axis=0, keepdims=True)).T  # (U, E)

    def mix(w):
        return jnp.einsum("ue,e...->u...", share, w.astype(jnp.float32)).astype(w.dtype)

    return ExpertWeights(mix(experts.w_gate), mix(experts.w_up), mix(experts.w_down))


def attach_united(params: ModelParams, config: ModelConfig, united: UnitedExperts) -> ModelParams:
    """Stacks each MoE layer's united experts after its originals (E + U along axis 0); onto
    packed stacks (``model.packed_params``) the united experts are packed first."""
    moe_layers = config.moe_layers
    if len(united.layers) != len(moe_layers):
        raise ValueError(
            f"united experts cover {len(united.layers)} MoE layers, the model has {len(moe_layers)}"
        )
    layers = list(params.layers)
    for united_layer, index in zip(united.layers, moe_layers, strict=True):
        mlp = layers[index].mlp
        assert isinstance(mlp, MoeParams)
        if mlp.group_of_expert is not None:
            raise ValueError(f"layer {index} already has united experts attached")
        added = united_layer.experts
        if mlp.experts.packed:
            # Packed stacks are bfloat16 (the kernels' weight type).
            added = jax.tree_util.tree_map(lambda w: pack_stack(w.astype(jnp.bfloat16)), added)
        combined = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), mlp.experts, added
        )
        layers[index] = layers[index].replace(
            mlp=mlp.replace(experts=combined, group_of_expert=united_layer.group_of_expert)
        )
    return params.replace(layers=tuple(layers))
