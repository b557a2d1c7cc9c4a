"""KV blocks on the host: the free list of the paged cache's pool. No JAX.

Block 0 is the null block and is never handed out: unused block-table entries point at it, so
writes of bucket padding land there harmlessly (see ``paged_cache``).
"""

from __future__ import annotations

NULL_BLOCK = 0


class BlockAllocator:
    """Free list of block ids 1 … num_blocks-1, with a holder count per block: a block full of
    a prompt's KV may be shared by the samples of one request (``share``), and returns to the
    free list when its last holder releases it."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be ≥ 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))
        self._holders = [0] * num_blocks

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
        taken = [self._free.pop() for _ in range(count)]
        for block in taken:
            self._holders[block] = 1
        return taken

    def share(self, blocks: list[int]) -> list[int]:
        """One more holder for each of ``blocks`` (held already); returns them."""
        for block in blocks:
            if self._holders[block] < 1:
                raise ValueError(f"block {block} is not held: it cannot be shared")
            self._holders[block] += 1
        return list(blocks)

    def holders(self, block: int) -> int:
        return self._holders[block]

    def release(self, blocks: list[int]) -> None:
        for block in reversed(blocks):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
