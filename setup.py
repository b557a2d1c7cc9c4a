"""Builds the optional C++ CPU kernel library (csrc/) next to the pure-Python package.

Everything else about the package is in pyproject.toml. The library is an XLA FFI handler
library loaded with ctypes (brownout_jax/cpu_kernels/library.py), not a Python module. Each
vector ISA has its own translation unit compiled with exactly its -m flags; the right one is
chosen at run time from what the CPU reports, so nothing is built for the build machine
alone (no -march=native). The extension is optional: without a C++ compiler, or without
jaxlib's FFI headers, the install still succeeds and the engine uses the pure-JAX path.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

CSRC = Path("csrc")
X86 = platform.machine().lower() in ("x86_64", "amd64")
COMMON_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fno-math-errno"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
SOURCE_FLAGS = {
    "ffi_expert_kernels.cc": [],
    "ffi_packed_linear.cc": [],
    "ffi_paged_attention.cc": [],
    "attention_generic.cc": [],
    "isa_generic.cc": [],
    "packed_generic.cc": [],
    **(
        {
            "isa_avx2.cc": ["-mavx2", "-mfma", "-mf16c"],
            "isa_avx512.cc": AVX512,
            "isa_avx512_bf16.cc": [*AVX512, "-mavx512bf16"],
            "packed_avx2.cc": ["-mavx2", "-mfma", "-mf16c"],
            "packed_avx512.cc": AVX512,
            "packed_avx512_bf16.cc": [*AVX512, "-mavx512bf16"],
            "attention_avx2.cc": ["-mavx2", "-mfma", "-mf16c"],
            "attention_avx512.cc": AVX512,
            "packed_amx_bf16.cc": [*AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"],
        }
        if X86
        else {}
    ),
}


def _jaxlib_include() -> str:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise CompileError("jaxlib is not importable at build time: no XLA FFI headers")
    include = Path(next(iter(spec.submodule_search_locations))) / "include"
    if not (include / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise CompileError(f"XLA FFI headers not found under {include}")
    return str(include)


class BuildCpuKernels(build_ext):
    """Compiles each source with its own flags, then links them into one shared library."""

    def build_extension(self, ext: Extension) -> None:
        include = _jaxlib_include()
        macros = [("BROWNOUT_HAVE_X86_KERNELS", "1")] if X86 else []
        objects = []
        for source in ext.sources:
            objects += self.compiler.compile(
                [source],
                output_dir=self.build_temp,
                macros=macros,
                include_dirs=[include, str(CSRC)],
                extra_postargs=COMMON_FLAGS + SOURCE_FLAGS[Path(source).name],
            )
        self.compiler.link_shared_object(
            objects,
            self.get_ext_fullpath(ext.name),
            extra_postargs=["-shared"],
            target_lang="c++",
        )


setup(
    ext_modules=[
        Extension(
            "brownout_jax.cpu_kernels._grouped_experts",
            sources=[str(CSRC / name) for name in SOURCE_FLAGS],
            language="c++",
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildCpuKernels},
)
