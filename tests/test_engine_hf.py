"""Greedy generation is token-identical to transformers, with chunked prefill and with preemption forced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dcpd.batch import DCPPlanConfig
from dcpd.engine import LLMEngine, SamplingParams
from dcpd.kv.cache import PagedKVCache
from dcpd.model.loader import load_model_dir
from tests.hf_models import make_checkpoint

PROMPT_LENGTHS = [1, 7, 16, 17, 45, 130, 260, 333]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, object, list[list[int]], list[list[int]]]:
    path = tmp_path_factory.mktemp(request.param)
    hf = make_checkpoint(path, request.param, seed=3)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    expected = []
    with torch.no_grad():
        for prompt in prompts:  # each prompt alone, as the reference
            ids = torch.tensor([prompt])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)  # fmt: skip
            expected.append(out[0, len(prompt) :].tolist())
    return path, hf, prompts, expected


def block_bytes(path: Path) -> int:
    cfg = load_model_dir(path).config
    return PagedKVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)


def run(path: Path, prompts: list[list[int]], config: DCPPlanConfig) -> tuple[LLMEngine, list]:
    engine = LLMEngine(load_model_dir(path), config)
    results = engine.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    return engine, results


def test_greedy_matches_transformers_with_chunked_prefill(checkpoint) -> None:
    path, _, prompts, expected = checkpoint
    engine, results = run(path, prompts, DCPPlanConfig(max_tokens_per_batch=64, kv_cache_bytes=8 << 20))
    for result, want in zip(results, expected, strict=True):
        assert result.token_ids == want, result.request_id
        assert result.finish_reason == ("stop" if len(want) < NEW_TOKENS else "length")
    stats = engine.stats()["attention"]
    assert stats["mixed_plans"] > 0  # prefill chunks really shared steps with decodes
    assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks


def test_greedy_matches_transformers_under_preemption(checkpoint) -> None:
    path, _, prompts, expected = checkpoint
    # room for the longest request alone (345 tokens = 22 blocks), not for all eight at once
    config = DCPPlanConfig(max_tokens_per_batch=128, kv_cache_bytes=30 * block_bytes(path), kv_reserve_fraction=0.05)
    engine, results = run(path, prompts, config)
    assert [r.token_ids for r in results] == expected
    assert sum(r.num_preemptions for r in results) > 0
    assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks
