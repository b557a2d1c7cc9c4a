"""The routed experts' one function boundary: tokens + router output + stacked weights →
output, through the backend the step was compiled for (``MoeOptions.backend``).

Brownout has already rewritten the expert ids when this runs; the backends (the C++ CPU
kernel, the Pallas kernels, the pure-JAX sorted tiles, the dense reference) plug in here
without touching the model.
"""

from __future__ import annotations

import functools
import logging

import jax

from brownout_jax.model.dims import Array, Bool, Float
from brownout_jax.model.params import ExpertWeights
from brownout_jax.moe.expert_backend import ExpertBackend
from brownout_jax.moe.expert_matmul import apply_experts_dense, apply_experts_sorted, tiling_for
from brownout_jax.moe.grouped_experts import apply_experts_cpu_kernel, apply_experts_pallas
from brownout_jax.moe.options import MoeOptions
from brownout_jax.moe.routing import RouterOutput


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


def apply_routed_experts(
    x: Float[Array, "N D"],
    routing: RouterOutput,
    experts: ExpertWeights,
    token_mask: Bool[Array, " N"],
    options: MoeOptions,
    num_united: int = 0,
) -> Float[Array, "N D"]:
    """Σ_k weight[n, k] · FFN_{expert[n, k]}(x[n]); ids ≥ the experts given get no row."""
    backend = resolve_backend(options.backend)
    if backend is not ExpertBackend.CPU_KERNEL and experts.packed:
        experts = experts.unpacked()  # only the CPU kernel reads packed stacks
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
