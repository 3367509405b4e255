"""Bad configs, batches and run inputs each get a clear error."""

from __future__ import annotations

import pytest
import torch

from dcpd.attention import create_decode_wrapper, create_prefill_wrapper, create_unified_wrapper
from dcpd.batch import BatchMetadata, BatchPhase, BatchRequest, DCPPlanConfig, PlanError
from dcpd.kv import PagedKVCache


def req(rid: str = "a", total: int = 20, computed: int = 0, new: int | None = None, prompt: int | None = None,
        blocks: list[int] | None = None) -> BatchRequest:  # fmt: skip
    return BatchRequest(
        request_id=rid,
        token_ids=list(range(total)),
        num_prompt_tokens=prompt or total,
        num_computed_tokens=computed,
        num_new_tokens=new,
        block_ids=blocks if blocks is not None else [0, 1],
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_batch_size", 0, "max_batch_size=0: must be >= 1"),
        ("max_tokens_per_batch", -5, "max_tokens_per_batch=-5"),
        ("block_size", 1.5, "block_size=1.5: must be an integer"),
        ("kv_cache_bytes", 0, "kv_cache_bytes=0"),
        ("kv_reserve_fraction", 1.0, "kv_reserve_fraction=1.0"),
        ("kv_reserve_fraction", "5%", "kv_reserve_fraction='5%': must be a number"),
        ("dcp_size", 0, "dcp_size=0"),
        ("dcp_rank", 2, "dcp_rank=2: must be in \\[0, dcp_size=1\\)"),
        ("interleave_size", 3, "interleave_size=3: must be a positive divisor of block_size=16"),
        ("interleave_size", True, "interleave_size=True"),
        ("dcp_rank", True, "dcp_rank=True"),
        ("all_reduce_strategy", "sum", "all_reduce_strategy='sum'"),
    ],
)
def test_config_rejects_bad_fields(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DCPPlanConfig(**{field: value})


def test_defaults() -> None:
    config = DCPPlanConfig()
    assert (config.max_batch_size, config.max_tokens_per_batch, config.block_size) == (256, 8192, 16)
    assert (config.dcp_size, config.dcp_rank, config.interleave_size) == (1, 0, 1)


@pytest.fixture
def prefill():
    return create_prefill_wrapper(
        4, 2, 8, kv_cache=PagedKVCache(2, 16, 16, 2, 8), config=DCPPlanConfig(max_batch_size=3, max_tokens_per_batch=64)
    )


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([], "empty batch"),
        ([req("a"), req("b"), req("c"), req("d")], "4 requests; max_batch_size is 3"),
        ([req("a", total=40, blocks=[0, 1, 2]), req("b", total=40, blocks=[3, 4, 5])], "80 new tokens; max_tokens"),
        ([req("a"), req("a")], "'a' appears twice"),
        ([req("a", total=20, blocks=[0])], "block table has 1 blocks, needs 2 for 20 tokens"),
        ([req("a", blocks=[0, 16])], r"block id 16 is not a block of the cache \(0\.\.15\)"),
        ([req("a", blocks=[0, 1.5])], "block id 1.5 is not a block"),
        ([req("a", blocks=[True, 2])], "block id True is not a block"),
        ([req("a", blocks=[3, 3])], "lists a block twice"),
        ([req("a", total=8, blocks=[5]), req("b", total=8, blocks=[5])], "write into the same KV block"),
        ([req("a", computed=20)], "no new tokens"),
        ([req("a", new=30)], "computes up to token 30 but has only 20"),
        ([req("a", computed=-1)], "num_computed_tokens must be >= 0"),
        ([req("a", prompt=-1)], "num_prompt_tokens must be >= 1"),
    ],
)
def test_plan_rejects_bad_batches(prefill, batch: list[BatchRequest], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        prefill.plan(batch)
    assert prefill.get_stats()["plans"] == 0


def test_plan_rejects_metadata_that_disagrees(prefill) -> None:
    batch = [req("a"), req("b", blocks=[2, 3])]
    meta = BatchMetadata.from_requests([req("a"), req("b", total=18, blocks=[2, 3])])
    with pytest.raises(PlanError, match=r"BatchMetadata\.query_lens"):
        prefill.plan(batch, meta)
    good = BatchMetadata.from_requests(batch)
    assert prefill.plan(batch, good).num_tokens == 40
    assert good.is_prefill() and not good.is_decode() and good.phase is BatchPhase.PREFILL


def test_decode_wrapper_takes_one_token_per_request() -> None:
    decode = create_decode_wrapper(4, 2, 8, kv_cache=PagedKVCache(1, 16, 16, 2, 8))
    with pytest.raises(PlanError, match="has 3 new tokens; decode takes exactly 1"):
        decode.plan([req("a", total=20, computed=17, prompt=10)])


def test_run_rejects_bad_tensors(prefill) -> None:
    plan = prefill.plan([req("a", total=10, blocks=[0])])
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    with pytest.raises(PlanError, match=r"q has shape \(9, 4, 8\), expected \(10, 4, 8\)"):
        prefill.run(plan, 0, q[:9], k, v)
    with pytest.raises(PlanError, match=r"k has shape \(10, 4, 8\)"):
        prefill.run(plan, 0, q, q, v)
    with pytest.raises(PlanError, match=r"dtype torch\.float16 does not match"):
        prefill.run(plan, 0, q.half(), k, v)
    with pytest.raises(PlanError, match="layer 2 out of range"):
        prefill.run(plan, 2, q, k, v)
    out = prefill.run(plan, 1, q, k, v)
    assert out.shape == (10, 4, 8) and torch.isfinite(out).all()


def test_wrapper_construction_errors() -> None:
    cache = PagedKVCache(1, 8, 16, 2, 8)
    with pytest.raises(ValueError, match="num_q_heads=3 must be a positive multiple of num_kv_heads=2"):
        create_prefill_wrapper(3, 2, 8, kv_cache=cache)
    with pytest.raises(ValueError, match="block_size=8 does not match"):
        create_prefill_wrapper(4, 2, 8, kv_cache=cache, config=DCPPlanConfig(block_size=8))
    with pytest.raises(ValueError, match="backend 'cuda-magic'"):
        create_unified_wrapper(4, 2, 8, kv_cache=cache, backend="cuda-magic")
    with pytest.raises(ValueError, match="kv_cache has 2 KV heads of dim 8, asked for 4 of dim 8"):
        create_decode_wrapper(4, 4, 8, kv_cache=cache)


def test_unified_rejects_bad_tensors_before_writing() -> None:
    cache = PagedKVCache(1, 16, 16, 2, 8)
    unified = create_unified_wrapper(4, 2, 8, kv_cache=cache)
    plan = unified.plan([req("a", total=4, blocks=[0]), req("b", total=20, computed=19, prompt=10, blocks=[1, 2])])
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    for bad_k, message in ((torch.randn(9, 2, 8), r"k has shape \(9, 2, 8\)"), (torch.randn(4, 2, 8), "k has shape")):
        with pytest.raises(PlanError, match=message):
            unified.run(plan, 0, q, bad_k, v)
    assert cache.kv.abs().sum() == 0  # nothing was written
    assert unified.run(plan, 0, q, k, v).shape == (5, 4, 8)


def test_unified_rejects_an_id_in_both_parts() -> None:
    unified = create_unified_wrapper(4, 2, 8, kv_cache=PagedKVCache(1, 16, 16, 2, 8))
    batch = [req("x", total=8, new=4, blocks=[0]), req("x", total=8, computed=4, new=1, prompt=4, blocks=[1])]
    with pytest.raises(PlanError, match="'x' appears twice"):
        unified.plan(batch)


def test_metadata_phases_are_checked(prefill) -> None:
    batch = [req("a", total=20, computed=19, prompt=10)]
    meta = BatchMetadata.from_requests(batch)
    wrong = BatchMetadata(meta.request_ids, (BatchPhase.PREFILL,), meta.query_lens, meta.context_lens,
                          meta.seq_lens, meta.query_start_loc)  # fmt: skip
    with pytest.raises(PlanError, match=r"BatchMetadata\.phases"):
        prefill.plan(batch, wrong)


def test_unified_validates_metadata_and_budget() -> None:
    unified = create_unified_wrapper(
        4, 2, 8, kv_cache=PagedKVCache(1, 16, 16, 2, 8), config=DCPPlanConfig(max_tokens_per_batch=30)
    )
    batch = [req("a", total=20, computed=19, prompt=10), req("b", total=20, blocks=[2, 3])]
    with pytest.raises(PlanError, match=r"BatchMetadata\.request_ids"):
        unified.plan(batch, BatchMetadata.from_requests(batch[::-1]))
    with pytest.raises(PlanError, match="max_tokens_per_batch is 30"):
        unified.plan([*batch, req("c", total=20, blocks=[4, 5])])
    plan = unified.plan(batch)
    assert plan.phase is BatchPhase.MIXED and plan.num_tokens == 21
    assert plan.positions.tolist() == [19, *range(20)]
