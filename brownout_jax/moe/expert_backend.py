"""How routed experts run (a static choice of every step), and its command-line flag. No JAX:
parsers import this cheaply."""

from __future__ import annotations

import enum


class ExpertBackend(enum.Enum):
    AUTO = "auto"  # the C++ CPU kernel on CPU when it is built, else SORTED_TILES
    CPU_KERNEL = "cpu_kernel"  # C++ grouped SwiGLU through XLA FFI (brownout_jax.cpu_kernels)
    SORTED_TILES = "sorted_tiles"  # pure JAX, cost ∝ non-empty experts: the reference path
    DENSE = "dense"  # every expert on every token: the slow, obviously correct twin
    PALLAS = "pallas"  # grouped-matmul Triton kernels (GPU; pallas_kernels/)
    PALLAS_INTERPRET = "pallas_interpret"  # the same kernels in Pallas interpret mode (tests)


# --experts-backend values → backends (the user-facing names).
CLI_CHOICES = {
    "auto": ExpertBackend.AUTO,
    "cpu-kernel": ExpertBackend.CPU_KERNEL,
    "reference": ExpertBackend.SORTED_TILES,
    "pallas": ExpertBackend.PALLAS,
}


def add_experts_backend_argument(parser) -> None:
    parser.add_argument(
        "--experts-backend",
        choices=tuple(CLI_CHOICES),
        default="auto",
        help="routed experts: auto (the C++ CPU kernel on CPU when built, else reference), "
        "cpu-kernel, reference (pure JAX sorted tiles), pallas (GPU Triton kernels)",
    )


def experts_backend_from_args(args) -> ExpertBackend:
    return CLI_CHOICES[getattr(args, "experts_backend", "auto")]
