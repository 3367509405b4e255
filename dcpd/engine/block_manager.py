"""Which KV blocks each request holds: allocation on growth, release on finish / abort / preemption."""

from __future__ import annotations

from dcpd.engine.request import Request
from dcpd.kv.block_pool import BlockPool


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks the request must add to hold its first `num_tokens` tokens."""
        return max(self.blocks_for(num_tokens) - len(request.block_ids), 0)

    def can_grow(self, request: Request, num_tokens: int, *, use_reserve: bool) -> bool:
        return self.pool.can_allocate(self.extra_blocks(request, num_tokens), use_reserve=use_reserve)

    def grow(self, request: Request, num_tokens: int, *, use_reserve: bool) -> None:
        """Allocate so the request holds `num_tokens` tokens (raises KVCacheExhausted, allocating nothing)."""
        extra = self.extra_blocks(request, num_tokens)
        if extra:
            last = request.block_ids[-1] if request.block_ids else None
            request.block_ids.extend(self.pool.allocate(extra, use_reserve=use_reserve, after=last))

    def release(self, request: Request) -> None:
        if request.block_ids:
            self.pool.free(request.block_ids)
            request.block_ids = []

    def fits_at_all(self, num_tokens: int) -> bool:
        """Could a request of this length ever run (alone, with the reserve)?"""
        return self.blocks_for(num_tokens) <= self.pool.num_blocks
