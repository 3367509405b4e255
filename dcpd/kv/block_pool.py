"""Block pool: fixed-size KV blocks handed out by id, with reference counts and a reserve.

The pool only does bookkeeping; the bytes live in `PagedKVCache`. Allocation
seeks consecutive ids: a request growing by a block first tries the id after
its last block, and a new allocation goes into the middle of the longest free
run when that leaves room to grow (else the first run that fits, else the
longest runs available). Attention reads a run of consecutive blocks as one
zero-copy view.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


class KVCacheExhausted(RuntimeError):
    """Not enough free blocks; nothing was allocated. The scheduler may preempt or wait."""

    def __init__(self, requested: int, available: int, reserve: int) -> None:
        super().__init__(
            f"KV cache exhausted: requested {requested} blocks, {available} free beyond a reserve of {reserve}"
        )
        self.requested = requested
        self.available = available
        self.reserve = reserve


class BlockPoolError(ValueError):
    """Misuse of the pool (double free, unknown block id); nothing was changed."""


@dataclass(frozen=True)
class BlockPoolStats:
    num_blocks: int
    num_free: int
    num_used: int
    reserve_blocks: int
    num_allocations: int
    num_frees: int
    num_refused: int

    @property
    def usage(self) -> float:
        return self.num_used / self.num_blocks


class BlockPool:
    def __init__(self, num_blocks: int, reserve_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"BlockPool.num_blocks={num_blocks}: must be >= 1")
        if not 0 <= reserve_blocks < num_blocks:
            raise ValueError(f"BlockPool.reserve_blocks={reserve_blocks}: must be in [0, num_blocks={num_blocks})")
        self.num_blocks = num_blocks
        self.reserve_blocks = reserve_blocks
        self._refcounts = [0] * num_blocks
        self._is_free = np.ones(num_blocks, dtype=np.bool_)
        self._num_free = num_blocks
        self._num_allocations = 0
        self._num_frees = 0
        self._num_refused = 0

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def available(self, *, use_reserve: bool = False) -> int:
        """Blocks an allocation may take now (the reserve is only for `use_reserve=True`)."""
        return self._num_free - (0 if use_reserve else self.reserve_blocks)

    def can_allocate(self, n: int, *, use_reserve: bool = False) -> bool:
        return n == 0 or n <= self.available(use_reserve=use_reserve)

    def allocate(self, n: int, *, use_reserve: bool = False, after: int | None = None) -> list[int]:
        """Take `n` blocks (refcount 1). `after`: a block the new ones should follow if possible.

        Raises KVCacheExhausted (and allocates nothing) when fewer than `n` are available.
        """
        if n < 0:
            raise BlockPoolError(f"cannot allocate a negative number of blocks ({n})")
        if after is not None:
            self._check_id(after, "allocate(after=...)")
        if not self.can_allocate(n, use_reserve=use_reserve):
            self._num_refused += 1
            raise KVCacheExhausted(n, max(self.available(use_reserve=use_reserve), 0), self.reserve_blocks)
        blocks: list[int] = []
        if after is not None:
            nxt = after + 1
            while len(blocks) < n and nxt < self.num_blocks and self._is_free[nxt]:
                blocks.append(nxt)
                nxt += 1
        if len(blocks) < n:
            self._is_free[blocks] = False
            blocks += self._take_runs(n - len(blocks))
        self._is_free[blocks] = False
        for block in blocks:
            self._refcounts[block] = 1
        self._num_free -= n
        self._num_allocations += n
        return blocks

    def _take_runs(self, n: int) -> list[int]:
        """n free ids, as few runs as possible, leaving room to grow.

        If the longest free run has room for n plus as much again, take n from
        its middle: the blocks after them stay free for this request's growth
        (its next block extends the run). Else the first free run that fits,
        else the longest runs first.
        """
        edges = np.diff(np.concatenate(([0], self._is_free.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        lengths = np.flatnonzero(edges == -1) - starts
        if lengths.size == 0:
            return []
        longest = int(np.argmax(lengths))
        if lengths[longest] >= 2 * n + 2:
            start = int(starts[longest]) + (int(lengths[longest]) - n) // 2
            return list(range(start, start + n))
        fits = np.flatnonzero(lengths >= n)
        if fits.size:
            start = int(starts[fits[0]])
            return list(range(start, start + n))
        blocks: list[int] = []
        for i in np.argsort(-lengths, kind="stable"):
            take = min(int(lengths[i]), n - len(blocks))
            blocks.extend(range(int(starts[i]), int(starts[i]) + take))
            if len(blocks) == n:
                break
        return blocks

    def incref(self, block_ids: Iterable[int]) -> None:
        """Share blocks that are already allocated (e.g. a reused prefix)."""
        ids = list(block_ids)
        self._validate_allocated(Counter(ids), "incref")
        for block in ids:
            self._refcounts[block] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference per id; blocks reaching zero return to the pool.

        All-or-nothing: an unknown id, or more frees than references, raises
        BlockPoolError before anything changes.
        """
        ids = list(block_ids)
        self._validate_allocated(Counter(ids), "free")
        for block in ids:
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                self._is_free[block] = True
                self._num_free += 1
        self._num_frees += len(ids)

    def refcount(self, block: int) -> int:
        self._check_id(block, "refcount")
        return self._refcounts[block]

    def stats(self) -> BlockPoolStats:
        return BlockPoolStats(
            num_blocks=self.num_blocks,
            num_free=self.num_free,
            num_used=self.num_used,
            reserve_blocks=self.reserve_blocks,
            num_allocations=self._num_allocations,
            num_frees=self._num_frees,
            num_refused=self._num_refused,
        )

    def _check_id(self, block: object, op: str) -> None:
        if not isinstance(block, int) or isinstance(block, bool) or not 0 <= block < self.num_blocks:
            raise BlockPoolError(f"{op}: unknown block id {block!r} (pool has ids 0..{self.num_blocks - 1})")

    def _validate_allocated(self, counts: Counter[int], op: str) -> None:
        for block, times in counts.items():
            self._check_id(block, op)
            held = self._refcounts[block]
            if held == 0:
                raise BlockPoolError(f"{op}: block {block} is not allocated (double free?)")
            if op == "free" and times > held:
                raise BlockPoolError(f"free: block {block} freed {times} times but holds {held} reference(s)")
