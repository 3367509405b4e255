"""Engine behaviour on the embedded default model: budgets, abort, preemption, sampling, invariants."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcpd.batch import BatchPhase, DCPPlanConfig
from dcpd.engine import FinishReason, LLMEngine, RequestError, SamplingParams
from dcpd.engine.request import Request
from dcpd.engine.sampler import Sampler
from dcpd.kv.cache import PagedKVCache
from dcpd.model.default import build_default_model

MODEL = build_default_model()
BLOCK_BYTES = PagedKVCache.bytes_per_block(MODEL.config.num_layers, 16, MODEL.config.num_kv_heads,
                                           MODEL.config.head_dim, torch.float32)  # fmt: skip
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def engine(**config) -> LLMEngine:
    return LLMEngine(MODEL, DCPPlanConfig(**config))


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def test_steps_respect_budgets_and_mix_phases() -> None:
    eng = engine(max_batch_size=3, max_tokens_per_batch=40)
    for i, n in enumerate((5, 90, 12, 7)):
        eng.add_request(prompt(n, i), GREEDY)
    phases = set()
    while eng.has_unfinished():
        out = eng.scheduler.schedule()
        assert len(out.scheduled) <= 3 and out.num_tokens <= 40
        phases.add(
            BatchPhase.MIXED if len({s.request.phase for s in out.scheduled}) > 1 else out.scheduled[0].request.phase
        )
        eng._postprocess(out, eng.runner.execute(out))
    assert BatchPhase.MIXED in phases and BatchPhase.DECODE in phases
    assert all(r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 8 for r in eng.requests.values())
    assert eng.kv_cache.pool.num_free == eng.kv_cache.num_blocks


def test_batching_does_not_change_greedy_outputs() -> None:
    prompts = [prompt(n, n) for n in (3, 40, 17, 130)]
    alone = [engine().generate([p], GREEDY)[0].token_ids for p in prompts]
    together = [r.token_ids for r in engine(max_tokens_per_batch=32).generate(prompts, GREEDY)]
    assert together == alone


def test_abort_frees_blocks_at_every_stage() -> None:
    eng = engine(max_tokens_per_batch=32)
    waiting = eng.add_request(prompt(10), GREEDY)
    eng.abort_request(waiting)  # before any step
    mid_prefill = eng.add_request(prompt(100), GREEDY)
    decoding = eng.add_request(prompt(5, 1), SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    eng.step()
    assert eng.requests[mid_prefill].num_computed_tokens == 32 and eng.requests[mid_prefill].block_ids
    assert eng.abort_request(mid_prefill)
    eng.step()
    eng.step()
    assert eng.requests[decoding].output_token_ids
    assert eng.abort_request(decoding)
    assert not eng.abort_request(decoding) and not eng.abort_request("nope")
    assert not eng.has_unfinished()
    assert [eng.requests[r].finish_reason for r in (waiting, mid_prefill, decoding)] == [FinishReason.ABORT] * 3
    assert eng.kv_cache.pool.num_free == eng.kv_cache.num_blocks


def test_preemption_recomputes_and_matches_unpreempted_run() -> None:
    prompts = [prompt(60, i) for i in range(6)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = engine().generate(prompts, params)
    tight_engine = engine(kv_cache_bytes=14 * BLOCK_BYTES, max_tokens_per_batch=256)  # 100 tokens = 7 blocks each
    tight = tight_engine.generate(prompts, params)
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]
    assert sum(r.num_preemptions for r in tight) > 0
    assert tight_engine.kv_cache.pool.num_free == tight_engine.kv_cache.num_blocks


def test_stop_tokens_and_eos() -> None:
    eng = engine()
    p = prompt(20, 3)
    free_run = eng.generate([p], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0].token_ids
    stop_at = free_run[4]
    first = free_run.index(stop_at)
    result = engine().generate([p], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    assert result.token_ids == free_run[: first + 1] and result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("prompt_ids", "params", "message"),
    [
        ([], GREEDY, "prompt is empty"),
        ([1, 999], GREEDY, r"outside the vocabulary \[0, 258\): \[999\]"),
        ([1] * 2000, SamplingParams(max_tokens=100), "exceeds the model's context of 2048"),
        ([1], SamplingParams(max_tokens=0), "max_tokens=0"),
        ([1], SamplingParams(temperature=-1.0), "temperature=-1.0"),
        ([1], SamplingParams(top_p=0.0), "top_p=0.0"),
        ([1], SamplingParams(top_k=-2), "top_k=-2"),
        ([1], SamplingParams(seed=2**64), r"seed=18446744073709551616: must be an integer in \[0, 2\*\*64\)"),
        ([1], SamplingParams(seed=-1), "seed=-1"),
    ],
)
def test_bad_requests_are_rejected_and_queue_nothing(prompt_ids, params, message) -> None:
    eng = engine()
    with pytest.raises(RequestError, match=message):
        eng.add_request(prompt_ids, params)
    assert not eng.has_unfinished() and not eng.requests


def test_a_top_k_beyond_the_vocabulary_means_no_top_k_and_fails_nothing() -> None:
    """A huge top_k (any integer a client can send) filters nothing; it must not fail the step, which
    would fail every request batched with it."""
    p = prompt(12)
    seeded = {"max_tokens": 6, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    want = engine().generate([p], SamplingParams(**seeded))[0].token_ids
    eng = engine()
    results = eng.generate([p, p], [SamplingParams(**seeded, top_k=2**63), SamplingParams(**seeded)])
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert results[0].token_ids == results[1].token_ids == want


def test_duplicate_ids_and_requests_larger_than_the_cache() -> None:
    eng = engine(kv_cache_bytes=4 * BLOCK_BYTES, kv_reserve_fraction=0.0)
    eng.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(RequestError, match="'x' is already in use"):
        eng.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(RequestError, match="needs 5 KV blocks; the cache has 4"):
        eng.add_request([1] * 70, GREEDY)


def test_a_prompt_reaching_into_the_reserve_runs_when_nothing_else_does() -> None:
    """20 blocks, 4 kept in reserve for running requests to grow into: a 300-token prompt (19 blocks,
    one first chunk) is valid, and with nothing running it is admitted into the reserve instead of
    waiting for blocks that can never be free beyond it."""
    eng = engine(kv_cache_bytes=20 * BLOCK_BYTES, kv_reserve_fraction=0.2)
    assert eng.kv_cache.pool.reserve_blocks == 4
    big = eng.add_request(prompt(300), GREEDY)
    small = eng.add_request(prompt(10, 1), GREEDY)  # waits behind it (first come, first served)
    for _ in range(40):
        if not eng.has_unfinished():
            break
        eng.step()
    assert [len(eng.requests[r].output_token_ids) for r in (big, small)] == [8, 8]
    assert eng.requests[big].token_ids[300:] == engine().generate([prompt(300)], GREEDY)[0].token_ids
    assert eng.kv_cache.pool.num_free == eng.kv_cache.num_blocks


def test_a_failing_step_fails_its_requests_not_the_engine(monkeypatch) -> None:
    eng = engine()
    rid = eng.add_request(prompt(10), GREEDY)

    def boom(_out, _on_layer=None):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(eng.runner, "execute", boom)
    outputs = eng.step()
    assert outputs[0].finish_reason is FinishReason.ERROR and "kernel exploded" in outputs[0].error
    assert eng.kv_cache.pool.num_free == eng.kv_cache.num_blocks
    monkeypatch.undo()
    assert engine().generate([prompt(10)], GREEDY)[0].finish_reason == "length"
    assert eng.requests[rid].is_finished


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 120)), max_size=40))
def test_any_sequence_of_operations_returns_every_block(ops) -> None:
    eng = engine(kv_cache_bytes=24 * BLOCK_BYTES, max_tokens_per_batch=64, max_batch_size=4)
    ids: list[str] = []
    for op, n in ops:
        if op == "add":
            ids.append(eng.add_request(prompt(n, n), SamplingParams(max_tokens=n % 30 + 1, temperature=0.7, seed=n)))
        elif op == "step":
            eng.step()
        elif ids:
            eng.abort_request(ids[n % len(ids)])
        used = sum(len(r.block_ids) for r in eng.requests.values())
        assert used == eng.kv_cache.pool.num_used  # blocks are held by exactly the live requests
    while eng.has_unfinished():
        eng.step()
    assert eng.kv_cache.pool.num_free == eng.kv_cache.num_blocks
    assert all(r.is_finished for r in eng.requests.values())


# -- sampling --------------------------------------------------------------------------------------
def fake(params: SamplingParams, rid: str = "r") -> Request:
    return Request(rid, [1], params)


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=42, ignore_eos=True)
    alone = engine().generate([prompt(9)], params)[0].token_ids
    others = SamplingParams(max_tokens=20, temperature=1.3, ignore_eos=True)
    mixed = engine().generate([prompt(30, 5), prompt(9), prompt(4, 7)], [others, params, others])[1].token_ids
    assert alone == mixed
    assert engine().generate([prompt(9)], SamplingParams(max_tokens=20, seed=43, ignore_eos=True))[0].token_ids != alone


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    reqs = [fake(SamplingParams(temperature=1.0, top_k=1)), fake(SamplingParams(temperature=2.0, top_p=1e-6)),
            fake(SamplingParams(temperature=0.0))]  # fmt: skip
    assert Sampler(0)(logits, reqs) == logits.argmax(-1).tolist()


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(1)
    draws = 4000

    def freq(params: SamplingParams) -> torch.Tensor:
        counts = torch.zeros(4)
        for token in sampler(logits.expand(draws, 4), [fake(params) for _ in range(draws)]):
            counts[token] += 1
        return counts / draws

    torch.testing.assert_close(freq(SamplingParams(temperature=1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03,
                               rtol=0)  # fmt: skip
    top_k = freq(SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top_k, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)
    top_p = freq(SamplingParams(temperature=1.0, top_p=0.7))  # keeps 0.5 and 0.3 (mass before 0.3 is 0.5 < 0.7)
    torch.testing.assert_close(top_p, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03, rtol=0)
    hot = freq(SamplingParams(temperature=100.0))
    assert (hot - 0.25).abs().max() < 0.04
