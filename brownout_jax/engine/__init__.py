"""The serving engine: continuous batching over a paged KV cache with SLO-aware brownout.

``from brownout_jax.engine import Engine`` is the public entry point; it is resolved lazily so
that the host-only modules of this package (scheduler, controller, requests) import no JAX.
"""

from __future__ import annotations

__all__ = ["Engine"]


def __getattr__(name: str):
    if name == "Engine":
        from brownout_jax.engine.front import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
