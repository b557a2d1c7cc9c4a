"""The sparse MoE block: route (top-k, then brownout) → routed experts → + shared expert.

On an expert-parallel mesh the routed experts run sharded (``expert_parallel``) and the block
also returns what each device computed, a typed output of the step that rides its one host
sync (the engine's per-device load statistics).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from brownout_jax.model.dense import dense_mlp
from brownout_jax.model.dims import Array, Bool, Float, Int
from brownout_jax.model.params import MoeParams
from brownout_jax.moe.brownout import route
from brownout_jax.moe.expert_parallel import (
    DeviceLoad,
    ExpertLayout,
    apply_experts_parallel,
    expert_load_per_device,
)
from brownout_jax.moe.experts import apply_routed_experts
from brownout_jax.moe.options import MoeOptions


@struct.dataclass
class MoeOutput:
    out: Float[Array, "N D"]
    expert_ids: Int[Array, "N K"]  # the experts each token ran (after brownout)
    device_load: DeviceLoad | None = None  # on an expert-parallel mesh: each device's work


def shared_expert(
    x: Float[Array, "N D"], params: MoeParams, token_mask: Bool[Array, " N"] | None = None
) -> Float[Array, "N D"] | float:
    """The sigmoid-gated shared expert (0 when the model has none); ``token_mask``: the rows
    whose output is used (padding may be skipped, and is then zero)."""
    if params.shared is None:
        return 0.0
    gate = jax.nn.sigmoid(jnp.dot(x, params.shared_gate))
    return gate * dense_mlp(x, params.shared, token_mask)


def moe_block(
    x: Float[Array, "N D"],
    params: MoeParams,
    token_mask: Bool[Array, " N"],
    top_k: int,
    norm_topk_prob: bool,
    options: MoeOptions,
    exact_tokens: Bool[Array, " N"] | None = None,
) -> MoeOutput:
    """``exact_tokens``: tokens whose requests are never browned out (see ``moe.brownout``)."""
    if options.mesh is not None:
        layout = ExpertLayout.of(params, options.mesh)
        num_groups = layout.padded_united  # groups past U have no members: never counted
    elif len(params.experts.w_gate.shape) != 3:
        raise ValueError("params are laid out for expert parallelism: pass MoeOptions(mesh=...)")
    else:
        layout, num_groups = None, params.num_united
    routing = route(
        x, params, token_mask, top_k, norm_topk_prob, options.threshold, num_groups, exact_tokens
    )
    if layout is None:
        out = apply_routed_experts(
            x, routing, params.experts, token_mask, options, params.num_united
        )
        return MoeOutput(out + shared_expert(x, params, token_mask), routing.expert_ids)
    out = apply_experts_parallel(x, routing, params.experts, token_mask, options, layout)
    load = expert_load_per_device(routing.expert_ids, token_mask, layout)
    return MoeOutput(out + shared_expert(x, params, token_mask), routing.expert_ids, load)
