"""Pallas GPU kernels for grouped expert matmuls, each with a pure-JAX reference beside it.

Modules, one job each: ``tiling`` (block sizes and presets), ``metadata`` (tile → group/row
arrays, computed in XLA), ``grouped_matmul`` (the Triton kernel bodies and the pallas_call),
``api`` (the public entry points) and ``reference`` (per-group loops); they import jax and
jaxtyping only. The benchmark is ``brownout_jax.bench.kernels`` (``brownout-jax bench
kernels``). The MoE block's glue (sort by expert, gather back) is
``brownout_jax.moe.grouped_experts``, shared with the C++ CPU kernel.
"""

from pallas_kernels.api import grouped_matmul, moe_down, moe_gate_up
from pallas_kernels.metadata import GroupMetadata, group_metadata, max_tiles
from pallas_kernels.reference import (
    grouped_matmul_reference,
    moe_down_reference,
    moe_gate_up_reference,
)
from pallas_kernels.tiling import DECODE, PREFILL, KernelTiling, fit_tiling, tiling_for_rows

__all__ = [
    "DECODE",
    "PREFILL",
    "GroupMetadata",
    "KernelTiling",
    "fit_tiling",
    "group_metadata",
    "grouped_matmul",
    "grouped_matmul_reference",
    "max_tiles",
    "moe_down",
    "moe_down_reference",
    "moe_gate_up",
    "moe_gate_up_reference",
    "tiling_for_rows",
]
