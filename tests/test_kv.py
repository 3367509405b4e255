"""Block pool bookkeeping and the paged KV cache tensors."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpd.batch import DCPPlanConfig
from dcpd.kv import BlockPool, BlockPoolError, KVCacheExhausted, PagedKVCache


def test_allocate_and_free_roundtrip() -> None:
    pool = BlockPool(10)
    a = pool.allocate(4)
    b = pool.allocate(3)
    assert len(set(a) | set(b)) == 7 and pool.num_free == 3 and pool.num_used == 7
    pool.free(a)
    assert pool.num_free == 7
    pool.free(b)
    assert pool.num_free == 10 and pool.stats().usage == 0.0
    stats = pool.stats()
    assert (stats.num_allocations, stats.num_frees) == (7, 7)


def test_exhaustion_is_typed_and_allocates_nothing() -> None:
    pool = BlockPool(5)
    pool.allocate(4)
    with pytest.raises(KVCacheExhausted, match="requested 2 blocks, 1 free") as info:
        pool.allocate(2)
    assert info.value.requested == 2 and info.value.available == 1
    assert pool.num_free == 1 and pool.stats().num_refused == 1


def test_reserve_is_only_for_running_requests() -> None:
    pool = BlockPool(10, reserve_blocks=3)
    assert pool.can_allocate(7) and not pool.can_allocate(8)
    assert pool.can_allocate(10, use_reserve=True)
    pool.allocate(7)
    with pytest.raises(KVCacheExhausted, match="reserve of 3"):
        pool.allocate(1)
    assert len(pool.allocate(3, use_reserve=True)) == 3
    assert pool.num_free == 0


def test_double_free_and_unknown_ids_are_errors_and_change_nothing() -> None:
    pool = BlockPool(8)
    blocks = pool.allocate(3)
    with pytest.raises(BlockPoolError, match="unknown block id 99"):
        pool.free([blocks[0], 99])
    with pytest.raises(BlockPoolError, match="unknown block id -1"):
        pool.free([-1])
    with pytest.raises(BlockPoolError, match="freed 2 times"):
        pool.free([blocks[0], blocks[0]])
    assert pool.num_used == 3  # nothing was freed by the failed calls
    pool.free(blocks)
    with pytest.raises(BlockPoolError, match="not allocated"):
        pool.free([blocks[1]])
    with pytest.raises(BlockPoolError, match="negative"):
        pool.allocate(-1)
    with pytest.raises(BlockPoolError, match=r"allocate\(after=\.\.\.\): unknown block id -3"):
        pool.allocate(2, after=-3)
    assert pool.num_used == 0
    assert pool.allocate(0) == []


def test_refcounts_keep_shared_blocks_alive() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.incref(blocks)
    assert pool.refcount(blocks[0]) == 2
    pool.free(blocks)
    assert pool.num_used == 2
    pool.free(blocks)
    assert pool.num_used == 0
    with pytest.raises(BlockPoolError, match="not allocated"):
        pool.incref(blocks)


def test_allocation_seeks_consecutive_ids() -> None:
    pool = BlockPool(12)
    assert pool.allocate(3) == [4, 5, 6]  # middle of the longest free run: room to grow after it
    assert pool.allocate(2, after=6) == [7, 8]  # growth extends the run
    # free runs now [0..3] and [9..11]: none has room for 3 + 3 + 2, so first fit
    assert pool.allocate(3) == [0, 1, 2]
    pool.free([0, 1, 2, 4, 5, 6, 7, 8])
    held = pool.allocate(12, use_reserve=True)
    pool.free([held[i] for i in (0, 2, 3, 5, 6, 8, 9, 10)])  # free runs: [0], [2, 3], [5, 6], [8, 9, 10]
    got = pool.allocate(5)  # no run fits: longest runs first
    assert got[:3] == [8, 9, 10] and len(set(got)) == 5 and set(got[3:]) in ({2, 3}, {5, 6})


def test_allocation_extends_runs_when_it_can() -> None:
    pool = BlockPool(16)
    first = pool.allocate(2)
    pool.allocate(1, after=first[-1])  # someone else takes the next block
    grown = pool.allocate(1, after=first[-1])
    assert grown != [first[-1] + 1]
    mine = pool.allocate(2)
    assert pool.allocate(2, after=mine[-1]) == [mine[-1] + 1, mine[-1] + 2]


@settings(max_examples=50, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(1, 6)), max_size=60), seed=st.integers(0, 1000))
def test_random_ops_never_leak_or_duplicate(ops: list[tuple[bool, int]], seed: int) -> None:
    rng = random.Random(seed)
    pool = BlockPool(32, reserve_blocks=2)
    held: list[list[int]] = []
    for alloc, n in ops:
        if alloc or not held:
            try:
                held.append(
                    pool.allocate(n, use_reserve=rng.random() < 0.5, after=rng.choice(held)[-1] if held else None)
                )
            except KVCacheExhausted:
                pass
        else:
            pool.free(held.pop(rng.randrange(len(held))))
        owned = [b for blocks in held for b in blocks]
        assert len(owned) == len(set(owned)) == pool.num_used
    for blocks in held:
        pool.free(blocks)
    assert pool.num_free == pool.num_blocks


def test_cache_from_config_respects_memory_budget() -> None:
    config = DCPPlanConfig(kv_cache_bytes=10 * 1024 * 1024, kv_reserve_fraction=0.1, block_size=16)
    cache = PagedKVCache.from_config(config, num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
    per_block = 4 * 2 * 2 * 16 * 64 * 2
    assert cache.num_blocks == 10 * 1024 * 1024 // per_block
    assert cache.kv.numel() * cache.kv.element_size() <= config.kv_cache_bytes
    assert cache.pool.reserve_blocks == -(-cache.num_blocks // 10)
    with pytest.raises(ValueError, match="kv_cache_bytes=1000: holds 0 blocks"):
        PagedKVCache.from_config(DCPPlanConfig(kv_cache_bytes=1000), num_layers=1, num_kv_heads=1, head_dim=64)


def test_gather_scatter_roundtrip_between_caches() -> None:
    src = PagedKVCache(3, 20, 4, 2, 8)
    src.kv.copy_(torch.randn_like(src.kv))
    blocks = [7, 2, 11, 3]
    buf = src.gather(blocks)
    assert buf.shape == (3, 2, 2, 4, 4, 8) and buf.is_contiguous()
    torch.testing.assert_close(buf[1, 0, 1, 2], src.kv[1, 0, 1, 11])
    dst = PagedKVCache(3, 30, 4, 2, 8)
    dst.scatter([0, 1, 2, 3], buf)
    torch.testing.assert_close(dst.gather([0, 1, 2, 3]), buf)
    # per-layer ranges (layer-wise streaming) and a preallocated output buffer
    out = torch.empty(1, 2, 2, 4, 4, 8)
    src.gather(blocks, layers=slice(2, 3), out=out)
    torch.testing.assert_close(out, buf[2:3])
    dst.scatter([10, 11, 12, 13], out, layers=slice(0, 1))
    torch.testing.assert_close(dst.gather([10, 11, 12, 13], layers=slice(0, 1)), out)


def test_gather_scatter_errors_name_the_problem() -> None:
    cache = PagedKVCache(1, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="out of range"):
        cache.gather([4])
    with pytest.raises(ValueError, match="gather out must be"):
        cache.gather([0], out=torch.empty(3))
    with pytest.raises(ValueError, match="scatter data must be"):
        cache.scatter([0, 1], torch.zeros(1, 2, 1, 1, 4, 8))
    with pytest.raises(ValueError, match="dtype"):
        cache.scatter([0], torch.zeros(1, 2, 1, 1, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="block ids must be integers"):
        cache.gather([1.7])
    with pytest.raises(ValueError, match="num_blocks=0"):
        PagedKVCache(1, 0, 4, 1, 8)
