"""A guard for XLA:CPU's memory mappings while the engine compiles its steps ahead of time.

XLA:CPU loads every kernel of an executable into its own pages (code, read-only data, data):
one engine step of the demo model holds ~500 memory mappings as long as it lives. Linux caps a
process at ``vm.max_map_count`` mappings (65530 by default), and past it LLVM fails inside XLA
with "Cannot allocate memory" and the process dies. The engine keeps every (phase, level,
bucket) executable for the whole run, so a large ladder × bucket grid reaches the cap on CPU.
This guard projects the total from the executables compiled so far and stops with the knobs
that shrink the grid, before the crash. GPU executables do not map their kernels this way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

_MAPS = Path("/proc/self/maps")
_LIMIT = Path("/proc/sys/vm/max_map_count")
HEADROOM = 0.9  # of the limit; the rest is for threads, buffers and later imports


class CompileBudgetError(RuntimeError):
    """The steps to compile would not fit in this process's memory-mapping limit."""


def count_mappings() -> int:
    with _MAPS.open() as f:
        return sum(1 for _ in f)


def mapping_limit() -> int | None:
    try:
        return int(_LIMIT.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclasses.dataclass
class MappingBudget:
    """Call :meth:`check` before each compilation; it raises once the executables compiled
    so far, extrapolated to all ``total`` of them, would cross the headroom."""

    total: int
    limit: int
    start: int
    compiled: int = 0

    @classmethod
    def for_cpu_compilation(cls, total: int, platform: str) -> MappingBudget | None:
        """None where no guard is needed (not XLA:CPU, or no /proc to read)."""
        if platform != "cpu" or not _MAPS.exists():
            return None
        limit = mapping_limit()
        if limit is None:
            return None
        return cls(total=total, limit=limit, start=count_mappings())

    def check(self) -> None:
        now = count_mappings()
        if self.compiled >= 2:  # one executable is a noisy sample (first-use allocations)
            per_step = max(0.0, (now - self.start) / self.compiled)
            projected = now + per_step * (self.total - self.compiled)
            if projected > HEADROOM * self.limit:
                raise CompileBudgetError(
                    f"compiling {self.total} engine steps on XLA:CPU needs about "
                    f"{projected:,.0f} memory mappings (≈{per_step:.0f} per step), more than "
                    f"{HEADROOM:.0%} of this process's limit vm.max_map_count={self.limit:,}; "
                    "compile fewer steps: a shorter --ladder (e.g. 0,0.5,1), a coarser "
                    "--bucket-growth (4), a smaller --max-model-len or --max-batch, or raise "
                    "the limit (sysctl -w vm.max_map_count=262144)"
                )
        self.compiled += 1
