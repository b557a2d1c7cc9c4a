"""How routed experts run in one step: a static argument of every step function."""

from __future__ import annotations

import dataclasses

import jax

from brownout_jax.moe.expert_backend import ExpertBackend
from brownout_jax.moe.expert_matmul import ExpertTiling


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
