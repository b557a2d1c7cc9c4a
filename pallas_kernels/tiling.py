"""Block sizes of the grouped-matmul kernels: a frozen tiling, named presets, and their choice.

A program of the kernels computes one (bm, bn) output block: bm rows of one group times bn
output columns, looping over the contraction in steps of bk. Triton wants every block
dimension a power of two and at least 16 for ``tl.dot``; the presets also divide the
Qwen1.5-MoE dimensions (hidden 2048, expert intermediate 1408 = 11·128), so no program ever
reads past the end of a weight matrix.

The preset is picked per static bucket of m (rows of the step), so every bucket compiles once:
decode steps have a handful of rows per expert (short tiles, narrow columns, many programs
to fill the GPU), prefill steps have tens to hundreds (taller tiles reuse each weight block).
"""

from __future__ import annotations

import dataclasses


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclasses.dataclass(frozen=True, slots=True)
class KernelTiling:
    """Block sizes and Triton launch parameters of one grouped-matmul kernel."""

    bm: int  # rows per tile (all of one group)
    bn: int  # output columns per program
    bk: int  # contraction step of the inner loop
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("bm", "bn", "bk"):
            value = getattr(self, name)
            if not is_power_of_two(value):
                raise ValueError(f"KernelTiling.{name} must be a power of two, got {value}")
        if self.num_warps <= 0 or self.num_stages <= 0:
            raise ValueError(
                f"num_warps and num_stages must be positive, got {self.num_warps}, "
                f"{self.num_stages}"
            )


# Decode: a few rows per touched expert; the cost is reading each touched expert's weights once.
DECODE = KernelTiling(bm=16, bn=64, bk=128, num_warps=4, num_stages=4)
# Prefill: tens of rows per expert; taller tiles amortise each weight block over more rows.
PREFILL = KernelTiling(bm=64, bn=128, bk=64, num_warps=4, num_stages=3)

# Rows of a step (m = tokens × top-k) from which PREFILL is used. At Qwen size (60 experts
# + 15 united) 1024 rows are ~14–17 rows per touched expert: one DECODE tile per expert below,
# several above. A first guess from the shapes; re-tune with `brownout-jax bench kernels`.
PREFILL_MIN_ROWS = 1024

# Triton's tl.dot needs every dimension of its operands to be at least 16.
MIN_DOT_DIM = 16
# Shared memory the software pipeline may use (A100 has 164 KiB per block, H100 228 KiB).
SHARED_MEMORY_BUDGET = 160 * 1024


def tiling_for_rows(m: int) -> KernelTiling:
    """The preset of the static bucket of ``m`` rows."""
    return PREFILL if m >= PREFILL_MIN_ROWS else DECODE


def _largest_pow2_divisor(dim: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and dim % (block * 2) == 0:
        block *= 2
    return block


def fit_tiling(tiling: KernelTiling, k: int, n: int) -> KernelTiling:
    """Shrinks bk and bn to the largest powers of two (up to the preset's) dividing k and n, so a
    preset also serves small shapes (tests, tiny models). Presets already divide Qwen sizes."""
    bk = _largest_pow2_divisor(k, tiling.bk)
    bn = _largest_pow2_divisor(n, tiling.bn)
    if (bk, bn) == (tiling.bk, tiling.bn):
        return tiling
    return dataclasses.replace(tiling, bk=bk, bn=bn)


def fit_stages(tiling: KernelTiling, itemsize: int, projections: int) -> KernelTiling:
    """Fewer pipeline stages when the preset's would not fit in shared memory (each stage holds
    one x block and one weight block per projection): bf16 presets fit as they are, fp32 ones
    with two weight projections would not."""
    per_stage = (tiling.bm * tiling.bk + projections * tiling.bk * tiling.bn) * itemsize
    stages = max(1, min(tiling.num_stages, SHARED_MEMORY_BUDGET // per_stage))
    if stages == tiling.num_stages:
        return tiling
    return dataclasses.replace(tiling, num_stages=stages)


def check_shapes(tiling: KernelTiling, k: int, n: int) -> None:
    """k and n must be whole multiples of the blocks: the kernels never mask columns."""
    if k % tiling.bk:
        raise ValueError(
            f"contraction size k={k} is not a multiple of the tiling's bk={tiling.bk}; "
            "pick a bk dividing k (see pallas_kernels.tiling.fit_tiling)"
        )
    if n % tiling.bn:
        raise ValueError(
            f"output size n={n} is not a multiple of the tiling's bn={tiling.bn}; "
            "pick a bn dividing n (see pallas_kernels.tiling.fit_tiling)"
        )


def check_triton_dot(tiling: KernelTiling) -> None:
    """The real (Triton) kernel needs bm, bn and bk of at least 16; interpret mode does not."""
    small = {
        name: getattr(tiling, name)
        for name in ("bm", "bn", "bk")
        if getattr(tiling, name) < MIN_DOT_DIM
    }
    if small:
        raise ValueError(
            f"the Triton kernel needs block sizes of at least {MIN_DOT_DIM} (tl.dot); got "
            f"{small}. Smaller tilings work only with interpret=True"
        )
