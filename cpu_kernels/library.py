"""Finding, loading and registering the compiled CPU kernel library (sources in ``csrc/``).

The library is a C++ extension built when the package is installed (``setup.py``). It is
optional: without a compiler the install still succeeds and :func:`load_library` reports
why the kernels are unavailable, so the model falls back to its pure-JAX expert path.
``BROWNOUT_JAX_CPU_KERNELS`` overrides where the library is looked for (a path), or turns it
off (``off``) — to test the fallback, or to try a rebuilt library.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import functools
import os
from pathlib import Path

ENV_VARIABLE = "BROWNOUT_JAX_CPU_KERNELS"
LIBRARY_STEM = "_grouped_experts"
GROUPED_SWIGLU_TARGET = "brownout_grouped_swiglu"
LINEAR_TARGET = "brownout_linear"
PACKED_LINEAR_TARGET = "brownout_packed_linear"
PACKED_GROUPED_SWIGLU_TARGET = "brownout_packed_grouped_swiglu"
PAGED_ATTENTION_TARGET = "brownout_paged_attention"


class Isa(enum.IntEnum):
    """Which vector copy of the kernel runs; AUTO picks the best the CPU has at run time."""

    AUTO = 0
    GENERIC = 1  # scalar C++, any CPU
    AVX2 = 2  # AVX2 + FMA
    AVX512 = 3  # AVX-512 F/BW/VL, fp32 multiply-adds
    AVX512_BF16 = 4  # AVX-512-BF16 pair dot products; bf16 activations and weights only
    AMX_BF16 = 5  # AMX tiles (packed matmul only, bf16 x); AUTO takes it from 16 rows on
    # Paged attention has AVX-512, AVX2 and scalar copies; AVX512_BF16 and AMX_BF16 resolve
    # like AUTO there.


@dataclasses.dataclass(frozen=True, slots=True)
class KernelLibrary:
    """The loaded library, or why there is none."""

    path: Path | None
    unavailable_reason: str | None
    handle: ctypes.CDLL | None = dataclasses.field(default=None, repr=False)

    @property
    def available(self) -> bool:
        return self.handle is not None

    def isa_name(self, isa: Isa, all_bf16: bool) -> str | None:
        """The copy ``isa`` resolves to on this CPU for these operand types, None if it lacks
        it (e.g. AVX512_BF16 on a CPU without AVX-512-BF16)."""
        if self.handle is None:
            return None
        name = self.handle.BrownoutCpuKernelIsa(int(isa), int(all_bf16)).decode()
        return name or None

    def packed_isa_name(self, isa: Isa, x_bf16: bool, rows: int) -> str | None:
        """The copy a packed matmul of ``rows`` rows runs with ``isa`` on this CPU (AUTO: the
        best; AMX from 16 rows of bf16 x), None if this CPU lacks it."""
        if self.handle is None:
            return None
        name = self.handle.BrownoutPackedLinearIsa(int(isa), int(x_bf16), int(rows)).decode()
        return name or None

    def packed_experts_isa_name(self, isa: Isa, x_bf16: bool) -> str | None:
        """The copy the packed-stack grouped SwiGLU runs with ``isa`` (AMX has none of its
        own: it resolves like AUTO), None if this CPU lacks it."""
        if self.handle is None:
            return None
        name = self.handle.BrownoutPackedExpertsIsa(int(isa), int(x_bf16)).decode()
        return name or None

    def attention_isa_name(self, isa: Isa, head_dim: int) -> str | None:
        """The copy paged attention runs with ``isa`` for this head dim (AUTO: the widest
        whose lanes divide it), None if this CPU lacks it or its lanes do not divide it."""
        if self.handle is None:
            return None
        name = self.handle.BrownoutPagedAttentionIsa(int(isa), int(head_dim)).decode()
        return name or None


def _packaged_library() -> Path | None:
    here = Path(__file__).resolve().parent
    found = sorted(here.glob(f"{LIBRARY_STEM}*.so"))
    return found[0] if found else None


@functools.cache
def load_library() -> KernelLibrary:
    """Loads the library and registers its XLA FFI targets for the CPU platform, once."""
    override = os.environ.get(ENV_VARIABLE, "").strip()
    if override.lower() == "off":
        return KernelLibrary(None, f"turned off by {ENV_VARIABLE}=off")
    path = Path(override) if override else _packaged_library()
    if path is None:
        return KernelLibrary(
            None,
            "the C++ kernel library was not built at install time (no C++ compiler, or the "
            "build failed: reinstall with `pip install -e .` and read its output)",
        )
    try:
        handle = ctypes.CDLL(str(path))
        handle.BrownoutCpuKernelIsa.restype = ctypes.c_char_p
        handle.BrownoutCpuKernelIsa.argtypes = (ctypes.c_int64, ctypes.c_int32)
        handle.BrownoutPackedLinearIsa.restype = ctypes.c_char_p
        handle.BrownoutPackedLinearIsa.argtypes = (ctypes.c_int64, ctypes.c_int32, ctypes.c_int64)
        handle.BrownoutPackedExpertsIsa.restype = ctypes.c_char_p
        handle.BrownoutPackedExpertsIsa.argtypes = (ctypes.c_int64, ctypes.c_int32)
        handle.BrownoutPagedAttentionIsa.restype = ctypes.c_char_p
        handle.BrownoutPagedAttentionIsa.argtypes = (ctypes.c_int64, ctypes.c_int64)
        targets = {
            GROUPED_SWIGLU_TARGET: handle.BrownoutGroupedSwiglu,
            LINEAR_TARGET: handle.BrownoutLinear,
            PACKED_LINEAR_TARGET: handle.BrownoutPackedLinear,
            PACKED_GROUPED_SWIGLU_TARGET: handle.BrownoutPackedGroupedSwiglu,
            PAGED_ATTENTION_TARGET: handle.BrownoutPagedAttention,
        }
    except (OSError, AttributeError) as err:
        return KernelLibrary(path, f"{path} cannot be loaded: {err}")
    import jax  # after the cheap checks: reporting "not built" needs no JAX

    for name, symbol in targets.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return KernelLibrary(path, None, handle)
