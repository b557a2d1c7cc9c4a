"""Which attention the engine's steps compile: the paged-attention kernel or XLA's ops.

KERNEL (``cpu_kernels.attention``) reads each row's keys and values in place, only up to its
own length, so a step's cost follows the tokens attended rather than a padded window: decode
steps need no block-table width buckets, and prefill can go in chunks that attend to the
cache written so far (memory bounded by the chunk, decode steps in between). XLA gathers
each row's window of blocks and masks it (the twin the kernel is tested against, and the path
off CPU): decode keeps its width buckets, and a prompt is prefilled in one step, attending to
itself. No JAX at import: the choice is host configuration.
"""

from __future__ import annotations

import enum
import os

ENV_VARIABLE = "BROWNOUT_JAX_ATTENTION"


class AttentionPath(enum.Enum):
    AUTO = "auto"  # the kernel where it runs (XLA:CPU with the library built), else XLA
    KERNEL = "kernel"
    XLA = "xla"


def resolve_attention(path: AttentionPath, head_dim: int) -> AttentionPath:
    """AUTO made concrete for this machine (``BROWNOUT_JAX_ATTENTION=kernel|xla`` overrides
    AUTO); KERNEL where the kernel cannot run is an error naming why."""
    import jax

    from brownout_jax.cpu_kernels.attention import paged_attention_runnable

    if path == AttentionPath.AUTO:
        forced = os.environ.get(ENV_VARIABLE, "").strip().lower()
        if forced:
            try:
                path = AttentionPath(forced)
            except ValueError:
                raise ValueError(f"{ENV_VARIABLE} must be kernel or xla, got {forced!r}") from None
    on_cpu = jax.default_backend() == "cpu"
    reason = paged_attention_runnable(head_dim) if on_cpu else "the kernel runs on CPU only"
    if path == AttentionPath.AUTO:
        return AttentionPath.KERNEL if reason is None else AttentionPath.XLA
    if path == AttentionPath.KERNEL and reason is not None:
        raise ValueError(f"attention=kernel cannot run here: {reason}")
    return path
