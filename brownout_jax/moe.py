"""The sparse MoE block and its one function boundary for routed experts.

``moe_block`` = router (softmax, top-k, optional renormalisation) → routed experts → plus the
sigmoid-gated shared expert. The routed-expert computation is a single call,
``apply_routed_experts(tokens, router output, stacked weights, token mask, options)``; the
brownout routing, the C++ CPU kernel and the Pallas kernels plug in behind it without touching
the model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from flax import struct

from brownout_jax.brownout import route_with_brownout
from brownout_jax.dense import swiglu_mlp
from brownout_jax.dims import Array, Bool, Float, Int
from brownout_jax.expert_backend import ExpertBackend
from brownout_jax.expert_matmul import (
    ExpertTiling,
    apply_experts_dense,
    apply_experts_sorted,
    tiling_for,
)
from brownout_jax.grouped_experts import apply_experts_cpu_kernel, apply_experts_pallas
from brownout_jax.params import DenseMlpParams, ExpertWeights, MoeParams


@functools.cache
def _say_cpu_kernel_missing(reason: str) -> None:
    # Once per process: the fallback is legitimate (no compiler at install) but slow.
    logging.getLogger("brownout_jax").warning(
        "CPU expert kernel unavailable (%s); routed experts use the pure-JAX "
        "reference path, several times slower on CPU",
        reason,
    )


def resolve_backend(backend: ExpertBackend) -> ExpertBackend:
    """AUTO → the C++ kernel on a CPU backend when its library loads, else the sorted tiles."""
    if backend is not ExpertBackend.AUTO:
        return backend
    if jax.default_backend() != "cpu":
        return ExpertBackend.SORTED_TILES
    from brownout_jax.cpu_kernels import load_library

    library = load_library()
    if library.available:
        return ExpertBackend.CPU_KERNEL
    _say_cpu_kernel_missing(library.unavailable_reason)
    return ExpertBackend.SORTED_TILES


@dataclasses.dataclass(frozen=True, slots=True)
class MoeOptions:
    """Static choices of how routed experts run; part of every step function's cache key."""

    backend: ExpertBackend = ExpertBackend.AUTO
    tiling: ExpertTiling | None = None  # sorted tiles only; None: from the step's static shape
    # Brownout threshold of this step (a ladder level); 1.0 compiles no brownout work at all.
    threshold: float = 1.0
    exempt_layers: tuple[int, ...] = ()  # layers that never brown out
    # Expert parallelism: experts sharded over this mesh's ``expert`` axis, params placed by
    # ``expert_parallel.shard_params``. A Mesh is hashable, so options stay a static argument.
    mesh: jax.sharding.Mesh | None = None

    def at_layer(self, layer: int) -> MoeOptions:
        if self.threshold < 1.0 and layer in self.exempt_layers:
            return dataclasses.replace(self, threshold=1.0)
        return self


DEFAULT_MOE_OPTIONS = MoeOptions()


@struct.dataclass
class RouterOutput:
    expert_ids: Int[Array, "N K"]
    expert_weights: Float[Array, "N K"]  # in the activation dtype, as HF casts them
    router_probs: Float[Array, "N E"]  # full softmax, fp32 (load statistics, distillation)


def route_top_k(
    x: Float[Array, "N D"], router: Float[Array, "D E"], top_k: int, norm_topk_prob: bool
) -> RouterOutput:
    logits = jnp.dot(x, router)  # activation dtype, like HF's F.linear
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return RouterOutput(
        expert_ids=ids.astype(jnp.int32), expert_weights=weights.astype(x.dtype), router_probs=probs
    )


def apply_routed_experts(
    x: Float[Array, "N D"],
    routing: RouterOutput,
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    options: MoeOptions,
    num_united: int = 0,
) -> Float[Array, "N D"]:
    """The MoE function boundary: tokens + router output + stacked weights → output."""
    backend = resolve_backend(options.backend)
    if backend is ExpertBackend.DENSE:
        return apply_experts_dense(
            x, routing.expert_ids, routing.expert_weights, experts, token_mask
        )
    if backend is ExpertBackend.CPU_KERNEL:
        return apply_experts_cpu_kernel(
            x, routing.expert_ids, routing.expert_weights, experts, token_mask
        )
    if backend in (ExpertBackend.PALLAS, ExpertBackend.PALLAS_INTERPRET):
        interpret = True if backend is ExpertBackend.PALLAS_INTERPRET else None
        return apply_experts_pallas(
            x, routing.expert_ids, routing.expert_weights, experts, token_mask, interpret=interpret
        )
    tiling = options.tiling or tiling_for(
        routing.expert_ids.size, expected_active_experts(experts.num_experts, num_united, options)
    )
    return apply_experts_sorted(
        x, routing.expert_ids, routing.expert_weights, experts, token_mask, tiling
    )


def expected_active_experts(num_experts: int, num_united: int, options: MoeOptions) -> int:
    """How many distinct experts a step is expected to touch, for sizing tiles: under brownout
    the hot set (about ``threshold`` of the routed experts) plus the united experts."""
    if options.threshold >= 1.0 or num_united == 0:
        return num_experts - num_united
    routed = num_experts - num_united
    return max(1, round(options.threshold * routed) + num_united)


def dense_mlp(
    x: Float[Array, "N D"], params: DenseMlpParams, token_mask: Bool[Array, " N"] | None = None
) -> Float[Array, "N D"]:
    """``token_mask``: rows whose output is used (padding may be skipped, and is then zero)."""
    return swiglu_mlp(x, params.w_gate, params.w_up, params.w_down, token_mask)


def moe_block(
    x: Float[Array, "N D"],
    params: MoeParams,
    token_mask: Bool[Array, " N"],
    top_k: int,
    norm_topk_prob: bool,
    options: MoeOptions,
    device_loads: list | None = None,
) -> Float[Array, "N D"]:
    """``device_loads``, when given on a mesh, collects at trace time this layer's
    ``expert_parallel.DeviceLoad`` of the routed (brownout-rewritten) ids: the engine's
    per-device load statistics, computed inside the step so they ride its one host sync."""
    routing = route_top_k(x, params.router, top_k, norm_topk_prob)
    layout = None
    if options.mesh is not None:
        # Imported here: expert_parallel builds on this module.
        from brownout_jax.expert_parallel import (
            ExpertLayout,
            apply_experts_parallel,
            expert_load_per_device,
        )

        layout = ExpertLayout.of(params, options.mesh)
        num_groups = layout.padded_united  # groups past U have no members: never counted
    elif params.experts.w_gate.ndim != 3:
        raise ValueError("params are laid out for expert parallelism: pass MoeOptions(mesh=...)")
    else:
        num_groups = params.num_united
    if options.threshold < 1.0:
        if params.group_of_expert is None:
            raise ValueError("a brownout threshold below 1 needs united experts (--united)")
        routing = routing.replace(
            expert_ids=route_with_brownout(
                routing.expert_ids,
                token_mask,
                params.group_of_expert,
                num_groups,
                options.threshold,
            )
        )
    if layout is not None:
        if device_loads is not None:
            device_loads.append(expert_load_per_device(routing.expert_ids, token_mask, layout))
        out = apply_experts_parallel(x, routing, params.experts, token_mask, options, layout)
    else:
        out = apply_routed_experts(
            x, routing, params.experts, token_mask, options, params.num_united
        )
    if params.shared is not None:
        gate = jax.nn.sigmoid(jnp.dot(x, params.shared_gate))
        out = out + gate * dense_mlp(x, params.shared, token_mask)
    return out
