"""CPU kernels for grouped expert matmuls (and the plain matmul of the dense layers): C++
(``csrc/``) behind XLA FFI, with a pure-JAX reference beside them. Depends on jax (and, for
the reference, the Pallas kernels' per-group references), not on the model.

Modules: ``library`` (find, load, register the compiled library; run-time ISA choice),
``packing`` (the packed weight layout the matmul kernels read), ``api`` (the checked,
jittable entry points), ``attention`` (paged attention over a block pool, with its float64
twin) and ``reference`` (the matmuls' slow twins).
"""

from brownout_jax.cpu_kernels.api import (
    KernelUnavailableError,
    grouped_swiglu,
    linear,
    packed_grouped_swiglu,
    packed_linear,
)
from brownout_jax.cpu_kernels.attention import (
    paged_attention,
    paged_attention_reference,
    paged_attention_runnable,
)
from brownout_jax.cpu_kernels.library import Isa, KernelLibrary, load_library
from brownout_jax.cpu_kernels.packing import (
    MatmulPath,
    PackedStack,
    PackedWeight,
    pack,
    pack_stack,
    packed_linear_xla,
    unpack,
    unpack_stack,
)
from brownout_jax.cpu_kernels.reference import grouped_swiglu_reference, packed_linear_reference

__all__ = [
    "Isa",
    "KernelLibrary",
    "KernelUnavailableError",
    "MatmulPath",
    "PackedStack",
    "PackedWeight",
    "grouped_swiglu",
    "grouped_swiglu_reference",
    "linear",
    "load_library",
    "pack",
    "pack_stack",
    "packed_grouped_swiglu",
    "packed_linear",
    "packed_linear_reference",
    "packed_linear_xla",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_runnable",
    "unpack",
    "unpack_stack",
]
