"""Paged prefill / decode / unified attention against naive float64 attention and SDPA."""

from __future__ import annotations

import random

import pytest
import torch

from dcpd.batch import AllReduceStrategy
from tests.attention_sim import TOLERANCE, DCPSim, sdpa_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["flash", "math"]
HEADS = [(4, 4), (8, 2), (4, 1)]  # MHA, GQA, MQA


def ragged_lengths(rng: random.Random, n: int, low: int, high: int) -> list[int]:
    return [rng.randint(low, high) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
def test_prefill_with_context_matches_reference(dtype: torch.dtype, backend: str, heads: tuple[int, int]) -> None:
    rng = random.Random(hash((str(dtype), backend, heads)) % 1000)
    sim = DCPSim(
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        dtype=dtype,
        backend=backend,
        fragment=True,
        seed=rng.randint(0, 99),
    )
    contexts = [0, 1, 15, 16, 17, 40] + ragged_lengths(rng, 4, 2, 90)
    news = [1, 16, 3, 33, 5, 17] + ragged_lengths(rng, 4, 1, 40)
    for i, (ctx, new) in enumerate(zip(contexts, news)):
        sim.add(f"r{i}", ctx + new)
    # first step caches the context (itself a chunked prefill), second computes the new tokens
    first = {f"r{i}": ctx for i, ctx in enumerate(contexts) if ctx > 0}
    sim.check(*sim.step(first, "prefill"))
    second = {f"r{i}": new for i, new in enumerate(news)}
    sim.check(*sim.step(second, "prefill"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
def test_decode_matches_reference(dtype: torch.dtype, backend: str, heads: tuple[int, int]) -> None:
    sim = DCPSim(num_q_heads=heads[0], num_kv_heads=heads[1], dtype=dtype, backend=backend, fragment=True, seed=3)
    rng = random.Random(7)
    prompts = [1, 15, 16, 17, 31, 64, 100] + ragged_lengths(rng, 5, 1, 200)
    for i, p in enumerate(prompts):
        sim.add(f"d{i}", p + 3, num_prompt=p)
    sim.check(*sim.step({f"d{i}": p for i, p in enumerate(prompts)}, "prefill"))
    for _ in range(3):  # three decode steps, each appending one token per request
        sim.check(*sim.step({f"d{i}": 1 for i in range(len(prompts))}, "decode"))


def test_prefill_without_context_matches_sdpa() -> None:
    sim = DCPSim(num_q_heads=8, num_kv_heads=2, head_dim=64, seed=11)
    lengths = [1, 7, 16, 129, 300]
    for i, n in enumerate(lengths):
        sim.add(f"s{i}", n)
    out, _, _ = sim.step({f"s{i}": n for i, n in enumerate(lengths)}, "prefill")
    start = 0
    for i, n in enumerate(lengths):
        req = sim.requests[f"s{i}"]
        ref = sdpa_attention(req.q.float(), req.k.float(), req.v.float(), sim.scale)
        torch.testing.assert_close(out[start : start + n], ref, atol=1e-5, rtol=1e-5)
        start += n


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_then_decode_over_many_steps(backend: str) -> None:
    """A long prompt in several chunks beside other requests, then decode: every step exact."""
    sim = DCPSim(num_q_heads=4, num_kv_heads=2, block_size=8, backend=backend, fragment=True, seed=5)
    sim.add("long", 250, num_prompt=240)
    sim.add("short", 30, num_prompt=20)
    for chunk in (64, 64, 64, 48):
        sim.check(*sim.step({"long": chunk}, "prefill"))
    sim.check(*sim.step({"short": 20}, "prefill"))
    for _ in range(10):
        sim.check(*sim.step({"long": 1, "short": 1}, "decode"))
    # the fragmented pool really split the long request: the workspace path ran
    assert sim.ranks[0].decode.get_stats()["gathered_requests"] > 0


@pytest.mark.parametrize("wrapper", ["prefill", "decode"])
def test_checkerboard_pool_mixes_views_and_workspace(wrapper: str) -> None:
    """Isolated free blocks go through the workspace while a long run stays a zero-copy view."""
    sim = DCPSim(num_blocks=96, block_size=8, seed=13)
    pool = sim.ranks[0].cache.pool
    pool.allocate(96)
    pool.free([*range(0, 40, 2), *range(48, 68)])  # 20 isolated free blocks and one run of 20
    sim.add("a", 320, num_prompt=319 if wrapper == "decode" else 320)
    sim.check(*sim.step({"a": 160}, "prefill"))  # first-fit: the run 48..67
    sim.check(*sim.step({"a": 159}, "prefill"))  # no run fits: 20 isolated blocks
    assert sim.ranks[0].block_tables["a"][:20] == list(range(48, 68))
    sim.check(*sim.step({"a": 1}, wrapper))  # 21 runs: one long view + one workspace call
    assert getattr(sim.ranks[0], wrapper).get_stats()["gathered_requests"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_long_runs_need_no_workspace(backend: str) -> None:
    """Five runs of 16+ blocks each: every run is a view; nothing is gathered (and no empty kernel call)."""
    sim = DCPSim(num_blocks=90, block_size=1, backend=backend, seed=17)
    pool = sim.ranks[0].cache.pool
    pool.allocate(90)
    pool.free([b for r in range(5) for b in range(r * 18, r * 18 + 17)])  # five free runs of 17
    sim.add("a", 81, num_prompt=80)
    for _ in range(5):
        sim.check(*sim.step({"a": 16}, "prefill"))  # each chunk takes the first run that fits
    sim.check(*sim.step({"a": 1}, "decode"))
    assert len({b // 18 for b in sim.ranks[0].block_tables["a"]}) == 5
    assert sim.ranks[0].decode.get_stats()["gathered_requests"] == 0


def test_attend_with_no_keys_is_empty_not_a_crash() -> None:
    from dcpd.attention.ops import attend

    for backend in BACKENDS:
        out, lse = attend(torch.randn(2, 1, 8), torch.randn(2, 0, 8), torch.randn(2, 0, 8), causal=False, scale=1.0,
                          backend=backend)  # fmt: skip
        assert torch.equal(out, torch.zeros(2, 1, 8)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unified_mixed_batch_in_request_order(dtype: torch.dtype) -> None:
    sim = DCPSim(num_q_heads=8, num_kv_heads=2, dtype=dtype, fragment=True, seed=9)
    for rid, total, prompt in (("a", 60, 50), ("b", 120, 100), ("c", 45, 40), ("d", 300, 300)):
        sim.add(rid, total, num_prompt=prompt)
    sim.check(*sim.step({"a": 50, "b": 100, "c": 40}, "unified"))  # all prefill
    sim.check(*sim.step({"a": 1, "d": 77, "b": 1, "c": 1}, "unified"))  # mixed: decodes around a prefill chunk
    sim.check(*sim.step({"d": 100, "c": 1}, "unified"))
    sim.check(*sim.step({"a": 1, "b": 1, "c": 1}, "unified"))  # all decode
    stats = sim.ranks[0].unified.get_stats()
    assert stats["plans"] == 4 and stats["runs"] == 4 and stats["mixed_plans"] == 2
    assert stats["requests"] == 3 + 4 + 2 + 3
    assert stats["tokens"] == 190 + 80 + 101 + 3
    assert stats["decode"]["requests"] == 3 + 1 + 3


def test_layers_are_independent() -> None:
    sim = DCPSim(num_layers=3, seed=4)
    sim.add("x", 40, num_prompt=39)
    sim.step({"x": 39}, "prefill", layer=2)
    cache = sim.ranks[0].cache
    assert cache.kv[0].abs().sum() == 0 and cache.kv[1].abs().sum() == 0
    assert cache.kv[2].abs().sum() > 0
    sim.check(*sim.step({"x": 1}, "decode", layer=2))


def test_wrapper_stats_count_real_work() -> None:
    sim = DCPSim(seed=2)
    sim.add("a", 20, num_prompt=19)
    sim.add("b", 40, num_prompt=39)
    sim.step({"a": 19, "b": 39}, "prefill")
    sim.step({"a": 1, "b": 1}, "decode")
    prefill = sim.ranks[0].prefill.get_stats()
    decode = sim.ranks[0].decode.get_stats()
    assert (prefill["plans"], prefill["runs"], prefill["requests"], prefill["tokens"]) == (1, 1, 2, 58)
    assert (decode["plans"], decode["runs"], decode["requests"], decode["tokens"]) == (1, 1, 2, 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tolerances_are_meaningful(dtype: torch.dtype) -> None:
    """A wrong scale is caught at each dtype's tolerance (the checks are not vacuous)."""
    sim = DCPSim(dtype=dtype, seed=1)
    sim.add("a", 50)
    out, lse, refs = sim.step({"a": 50}, "prefill")
    with pytest.raises(AssertionError):
        sim.check(out * 1.1, lse, refs)
    assert TOLERANCE[dtype] < 0.1


def test_strategy_choice_reaches_config() -> None:
    sim = DCPSim(dcp_size=2, strategy=AllReduceStrategy.ALL_GATHER_MERGE)
    assert all(r.prefill.config.all_reduce_strategy is AllReduceStrategy.ALL_GATHER_MERGE for r in sim.ranks)
