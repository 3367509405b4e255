"""Paged decode / prefill attention vs torch SDPA on the same data held contiguously.

    python benchmarks/bench_attention.py [--json] [--repeats N]

Decode: 32 requests x 2048 cached tokens, head dim 64, fp32, MHA (8/8 heads) and
GQA (32/8). Prefill: 1..4 requests x 2048 new tokens, causal. Times are medians of
`run()` for one layer (the plan is built once per step and shared by all layers;
its cost is reported separately), measured interleaved with the SDPA baseline so
both see the same machine noise. Ratios are dcpd time / SDPA time (lower is better).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dcpd.attention import BatchDCPDecodeWrapper, BatchDCPPrefillWrapper
from dcpd.batch import BatchRequest, DCPPlanConfig
from dcpd.kv import PagedKVCache

HEAD_DIM = 64
BLOCK = 16


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def decode_case(num_q_heads: int, num_kv_heads: int, repeats: int, fragmented: bool) -> dict[str, float]:
    batch, context = 32, 2048
    blocks_per_req = context // BLOCK
    num_blocks = batch * blocks_per_req * (2 if fragmented else 1) + 8
    cache = PagedKVCache(1, num_blocks, BLOCK, num_kv_heads, HEAD_DIM)
    if fragmented:  # worst case: every other block pinned, so no request gets two consecutive ids
        cache.pool.free([b for b in cache.pool.allocate(num_blocks) if b % 2 == 0])
    cache.kv.normal_()
    config = DCPPlanConfig(block_size=BLOCK)
    wrapper = BatchDCPDecodeWrapper(config, cache, num_q_heads)
    requests = [
        BatchRequest(
            request_id=f"r{i}",
            token_ids=[0] * context,
            num_prompt_tokens=context - 1,
            num_computed_tokens=context - 1,
            block_ids=cache.pool.allocate(blocks_per_req),
        )
        for i in range(batch)
    ]
    q = torch.randn(batch, num_q_heads, HEAD_DIM)
    k_new = torch.randn(batch, num_kv_heads, HEAD_DIM)
    v_new = torch.randn(batch, num_kv_heads, HEAD_DIM)
    plan = wrapper.plan(requests)
    wrapper.run(plan, 0, q, k_new, v_new)  # writes the new tokens so both sides see identical data
    # the same KV, contiguous [B, H, L, D]
    gathered = torch.stack([cache.gather(r.block_ids)[0] for r in requests])  # [B, 2, H, n, bs, D]
    k_dense = gathered[:, 0].reshape(batch, num_kv_heads, context, HEAD_DIM).contiguous()
    v_dense = gathered[:, 1].reshape(batch, num_kv_heads, context, HEAD_DIM).contiguous()
    q_dense = q.unsqueeze(2)
    gqa = num_q_heads != num_kv_heads

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q_dense, k_dense, v_dense, enable_gqa=gqa)

    ours = wrapper.run(plan, 0, q, k_new, v_new)
    torch.testing.assert_close(ours, sdpa().squeeze(2), atol=1e-4, rtol=1e-4)
    times = interleaved_medians(
        {"dcpd": lambda: wrapper.run(plan, 0, q, k_new, v_new), "sdpa": sdpa, "plan": lambda: wrapper.plan(requests)},
        repeats,
    )
    return {
        "dcpd_ms": times["dcpd"],
        "sdpa_ms": times["sdpa"],
        "plan_ms": times["plan"],
        "ratio": times["dcpd"] / times["sdpa"],
    }


def prefill_case(num_requests: int, num_heads: int, repeats: int) -> dict[str, float]:
    length = 2048
    blocks_per_req = length // BLOCK
    cache = PagedKVCache(1, num_requests * blocks_per_req + 8, BLOCK, num_heads, HEAD_DIM)
    wrapper = BatchDCPPrefillWrapper(DCPPlanConfig(block_size=BLOCK), cache, num_heads)
    requests = [
        BatchRequest(
            request_id=f"p{i}",
            token_ids=[0] * length,
            num_prompt_tokens=length,
            block_ids=cache.pool.allocate(blocks_per_req),
        )
        for i in range(num_requests)
    ]
    plan = wrapper.plan(requests)
    q, k, v = (torch.randn(num_requests * length, num_heads, HEAD_DIM) for _ in range(3))
    dense = [t.view(num_requests, length, num_heads, HEAD_DIM).transpose(1, 2).contiguous() for t in (q, k, v)]

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(*dense, is_causal=True)

    ours = wrapper.run(plan, 0, q, k, v)
    reference = sdpa().transpose(1, 2).reshape(num_requests * length, num_heads, HEAD_DIM)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    times = interleaved_medians({"dcpd": lambda: wrapper.run(plan, 0, q, k, v), "sdpa": sdpa}, repeats)
    return {"dcpd_ms": times["dcpd"], "sdpa_ms": times["sdpa"], "ratio": times["dcpd"] / times["sdpa"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    results: dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    decode = {
        "mha_8x8": decode_case(8, 8, args.repeats, fragmented=False),
        "gqa_32x8": decode_case(32, 8, args.repeats, fragmented=False),
        "mha_8x8_fragmented": decode_case(8, 8, args.repeats, fragmented=True),
    }
    prefill = {f"{n}x2048": prefill_case(n, 8, max(args.repeats // 3, 5)) for n in (1, 2, 4)}
    results["decode"] = decode
    results["prefill"] = prefill
    results["decode_ratio_vs_sdpa"] = statistics.median(d["ratio"] for k, d in decode.items() if "fragmented" not in k)
    results["decode_fragmented_ratio_vs_sdpa"] = decode["mha_8x8_fragmented"]["ratio"]
    results["prefill_ratio_vs_sdpa"] = statistics.median(p["ratio"] for p in prefill.values())
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"torch {results['torch']}, {results['threads']} threads, fp32, head dim {HEAD_DIM}, block size {BLOCK}")
    for name, row in {
        **{f"decode {k}": v for k, v in decode.items()},
        **{f"prefill {k}": v for k, v in prefill.items()},
    }.items():
        print(f"{name:28s} dcpd {row['dcpd_ms']:8.2f} ms   sdpa {row['sdpa_ms']:8.2f} ms   ratio {row['ratio']:.2f}")
    print(f"decode_ratio_vs_sdpa {results['decode_ratio_vs_sdpa']:.2f} (target <= 2.0)")
    print(f"prefill_ratio_vs_sdpa {results['prefill_ratio_vs_sdpa']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
