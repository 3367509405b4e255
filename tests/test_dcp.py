"""DCP sharding: N simulated ranks, each attending over its shard; every strategy's merge equals unsharded attention."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcpd.attention.dcp import local_index, local_length, local_lengths, owner_rank, owner_ranks
from dcpd.batch import AllReduceStrategy
from tests.attention_sim import DCPSim

STRATEGIES = list(AllReduceStrategy)


@pytest.mark.parametrize("dcp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("interleave", [1, 16])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dcp_prefill_and_decode_match_unsharded(dcp_size: int, interleave: int, strategy: AllReduceStrategy) -> None:
    sim = DCPSim(
        dcp_size=dcp_size,
        interleave=interleave,
        num_q_heads=12,
        num_kv_heads=2,
        strategy=strategy,
        fragment=True,
        seed=dcp_size,
    )
    rng = random.Random(dcp_size * 31 + interleave)
    prompts = [1, 2, 5, 16, 33, 70] + [rng.randint(1, 150) for _ in range(4)]
    for i, p in enumerate(prompts):
        sim.add(f"r{i}", p + 4, num_prompt=p)
    heads = slice(None)
    if strategy is AllReduceStrategy.LSE_AG_REDUCE_SCATTER:
        heads = slice(0, 12 // dcp_size)  # rank 0 keeps head slice 0
    # chunked prefill: first half, then the rest (context now sharded across ranks)
    first = {f"r{i}": max(p // 2, 1) for i, p in enumerate(prompts)}
    sim.check(*sim.step(first, "prefill"), head_slice=heads)
    rest = {f"r{i}": p - first[f"r{i}"] for i, p in enumerate(prompts) if p - first[f"r{i}"] > 0}
    sim.check(*sim.step(rest, "prefill"), head_slice=heads)
    for _ in range(4):
        sim.check(*sim.step({f"r{i}": 1 for i in range(len(prompts))}, "decode"), head_slice=heads)


@pytest.mark.parametrize("dcp_size", [2, 4])
def test_dcp_unified_mixed_batch(dcp_size: int) -> None:
    sim = DCPSim(dcp_size=dcp_size, interleave=4, block_size=8, seed=21)
    sim.add("a", 40, num_prompt=30)
    sim.add("b", 90, num_prompt=90)
    sim.check(*sim.step({"a": 30, "b": 20}, "unified"))
    sim.check(*sim.step({"a": 1, "b": 50}, "unified"))
    sim.check(*sim.step({"b": 20, "a": 1}, "unified"))


def test_each_rank_stores_only_its_shard() -> None:
    sim = DCPSim(dcp_size=3, interleave=2, block_size=4, seed=8)
    sim.add("a", 23)
    sim.step({"a": 23}, "prefill")
    for rank, state in enumerate(sim.ranks):
        table = state.block_tables["a"]
        expected = [p for p in range(23) if (p // 2) % 3 == rank]
        assert len(table) == -(-len(expected) // 4)
        stored = state.cache.gather(table)[0, 0]  # K of layer 0: [Hkv, n, bs, D]
        stored = stored.reshape(stored.shape[0], -1, stored.shape[-1])[:, : len(expected)]
        want = sim.requests["a"].k[expected].float().transpose(0, 1)
        torch.testing.assert_close(stored, want)


@given(length=st.integers(0, 500), dcp_size=st.integers(1, 5), interleave=st.sampled_from([1, 2, 4, 8, 16]))
def test_shard_math_matches_brute_force(length: int, dcp_size: int, interleave: int) -> None:
    owners = [(p // interleave) % dcp_size for p in range(length)]
    for rank in range(dcp_size):
        mine = [p for p in range(length) if owners[p] == rank]
        assert local_length(length, rank, dcp_size, interleave) == len(mine)
        assert int(local_lengths(torch.tensor([length]), rank, dcp_size, interleave)[0]) == len(mine)
        if mine:
            idx = local_index(torch.tensor(mine), dcp_size, interleave)
            assert idx.tolist() == list(range(len(mine)))
    if length:
        positions = torch.arange(length)
        assert owner_ranks(positions, dcp_size, interleave).tolist() == owners
        assert owner_rank(length - 1, dcp_size, interleave) == owners[-1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dcp_size=st.integers(1, 4),
    interleave=st.sampled_from([1, 2, 8]),
    heads=st.sampled_from([(2, 2), (4, 1), (6, 3)]),
    fragment=st.booleans(),
)
def test_random_batches_property(
    data: st.DataObject, dcp_size: int, interleave: int, heads: tuple[int, int], fragment: bool
) -> None:
    """Random ragged batches, random chunking: merged DCP attention equals the float64 reference."""
    sim = DCPSim(
        dcp_size=dcp_size,
        interleave=interleave,
        block_size=8,
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=16,
        fragment=fragment,
        seed=data.draw(st.integers(0, 10_000)),
        strategy=data.draw(st.sampled_from([AllReduceStrategy.ALL_GATHER_MERGE, AllReduceStrategy.LSE_AG_ALL_REDUCE])),
    )
    totals = data.draw(st.lists(st.integers(1, 60), min_size=1, max_size=6))
    for i, total in enumerate(totals):
        sim.add(f"r{i}", total)
    remaining = dict(enumerate(totals))
    while remaining:
        chunk = {}
        for i in list(remaining):
            n = data.draw(st.integers(1, remaining[i]))
            chunk[f"r{i}"] = n
            remaining[i] -= n
            if remaining[i] == 0:
                del remaining[i]
        sim.check(*sim.step(chunk, "prefill"))
    pinned = [rank.cache.pool.num_used - sum(map(len, rank.block_tables.values())) for rank in sim.ranks]
    sim.free_all()
    for rank, held in zip(sim.ranks, pinned):
        assert rank.cache.pool.num_used == held  # only the fragmentation ballast remains
