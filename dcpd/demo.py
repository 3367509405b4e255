"""`dcpd demo`: the attention engine at work on a small continuous batch, checked as it runs.

Three requests of different prompt lengths go through chunked prefill under a
token budget, then decode, in mixed batches, on a DCP group of 1 and of 2 ranks
(simulated in one process). Every step's attention output is compared with
torch's scaled_dot_product_attention over each request's full K/V history.
The model (next milestone) replaces this with real generation.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dcpd.attention.local_group import LocalDCPGroup, StepRequest
from dcpd.batch import AllReduceStrategy, BatchPhase, DCPPlanConfig

HEADS_Q, HEADS_KV, HEAD_DIM, LAYERS = 8, 2, 64, 2


@dataclass
class DemoRequest:
    rid: str
    prompt_len: int
    total_len: int
    q: torch.Tensor  # [layers, total, Hq, D]
    k: torch.Tensor  # [layers, total, Hkv, D]
    v: torch.Tensor
    computed: int = 0


def _sdpa_reference(req: DemoRequest, layer: int, start: int, end: int) -> torch.Tensor:
    q = req.q[layer, start:end].transpose(0, 1)
    k = req.k[layer, :end].transpose(0, 1)
    v = req.v[layer, :end].transpose(0, 1)
    visible = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    return out.transpose(0, 1)


def run_demo(dcp_size: int, token_budget: int = 64, decode_steps: int = 6, seed: int = 0) -> dict[str, object]:
    gen = torch.Generator().manual_seed(seed)
    config = DCPPlanConfig(
        max_tokens_per_batch=token_budget,
        dcp_size=dcp_size,
        all_reduce_strategy=AllReduceStrategy.LSE_AG_ALL_REDUCE,
    )
    group = LocalDCPGroup(
        config, num_layers=LAYERS, num_blocks=64, num_q_heads=HEADS_Q, num_kv_heads=HEADS_KV, head_dim=HEAD_DIM
    )
    requests = []
    for i, prompt in enumerate((5, 37, 150)):
        total = prompt + decode_steps
        requests.append(
            DemoRequest(
                f"req-{i}",
                prompt,
                total,
                torch.randn(LAYERS, total, HEADS_Q, HEAD_DIM, generator=gen),
                torch.randn(LAYERS, total, HEADS_KV, HEAD_DIM, generator=gen),
                torch.randn(LAYERS, total, HEADS_KV, HEAD_DIM, generator=gen),
            )
        )
    steps = []
    while any(r.computed < r.total_len for r in requests):
        budget = token_budget
        batch: list[tuple[DemoRequest, int]] = []
        for req in requests:  # decodes first, then prefill chunks in the remaining budget
            if req.computed >= req.prompt_len and req.computed < req.total_len and budget > 0:
                batch.append((req, 1))
                budget -= 1
        for req in requests:
            if req.computed < req.prompt_len and budget > 0:
                n = min(req.prompt_len - req.computed, budget)
                batch.append((req, n))
                budget -= n
        step = [StepRequest(r.rid, [0] * r.total_len, r.prompt_len, r.computed, n) for r, n in batch]
        started = time.perf_counter()
        max_err = 0.0
        for layer in range(LAYERS):
            q = torch.cat([r.q[layer, r.computed : r.computed + n] for r, n in batch])
            k = torch.cat([r.k[layer, r.computed : r.computed + n] for r, n in batch])
            v = torch.cat([r.v[layer, r.computed : r.computed + n] for r, n in batch])
            out, _ = group.forward(step, layer, q, k, v)[0]
            reference = torch.cat([_sdpa_reference(r, layer, r.computed, r.computed + n) for r, n in batch])
            max_err = max(max_err, (out - reference).abs().max().item())
        elapsed_ms = (time.perf_counter() - started) * 1e3
        phases = {BatchPhase.DECODE if r.computed >= r.prompt_len else BatchPhase.PREFILL for r, _ in batch}
        phase = phases.pop() if len(phases) == 1 else BatchPhase.MIXED
        for r, n in batch:
            r.computed += n
        steps.append(
            {
                "phase": phase.value,
                "requests": len(batch),
                "tokens": sum(n for _, n in batch),
                "max_abs_err": max_err,
                "ms": round(elapsed_ms, 2),
            }
        )
    for r in requests:
        group.free(r.rid)
    leaked = sum(s.cache.pool.num_used for s in group.ranks)
    return {
        "dcp_size": dcp_size,
        "steps": steps,
        "max_abs_err": max(s["max_abs_err"] for s in steps),
        "blocks_leaked": leaked,
        "stats": group.ranks[0].unified.get_stats(),
    }


def main(as_json: bool = False) -> int:
    torch.manual_seed(0)
    results = [run_demo(dcp_size) for dcp_size in (1, 2)]
    ok = all(r["max_abs_err"] < 1e-4 and r["blocks_leaked"] == 0 for r in results)
    if as_json:
        print(json.dumps({"ok": ok, "runs": results}, indent=2))
        return 0 if ok else 1
    print(f"dcpd attention demo: {HEADS_Q} q heads / {HEADS_KV} kv heads, head dim {HEAD_DIM}, {LAYERS} layers, fp32")
    for result in results:
        print(f"\nDCP group of {result['dcp_size']} rank(s); every step checked against torch SDPA")
        print(f"  {'step':>4} {'phase':>8} {'reqs':>5} {'tokens':>7} {'max|err|':>10} {'ms':>8}")
        for i, s in enumerate(result["steps"]):  # type: ignore[union-attr]
            err, ms = s["max_abs_err"], s["ms"]
            print(f"  {i:>4} {s['phase']:>8} {s['requests']:>5} {s['tokens']:>7} {err:>10.2e} {ms:>8.2f}")
        print(f"  KV blocks leaked after freeing every request: {result['blocks_leaked']}")
    print("\nOK: paged attention matches SDPA on every step" if ok else "\nFAILED: see errors above")
    return 0 if ok else 1
