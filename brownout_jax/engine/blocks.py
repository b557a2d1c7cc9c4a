"""KV blocks on the host: the free list of the paged cache's pool. No JAX.

Block 0 is the null block and is never handed out: unused block-table entries point at it, so
writes of bucket padding land there harmlessly (see ``paged_cache``).
"""

from __future__ import annotations

NULL_BLOCK = 0


class BlockAllocator:
    """Free list of block ids 1 … num_blocks-1."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be ≥ 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """``count`` blocks, or None (and nothing taken) if fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
