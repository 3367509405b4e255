"""Test harness: an independent float64 reference and random requests on a simulated DCP group.

Requests get random float64 q/k/v for every position; a step computes some new
tokens of each request on every rank of a `LocalDCPGroup` (own KV cache, block
pool and wrappers per rank), merges the partials with an AllReduceStrategy's
reference math, and is compared with naive softmax attention over the full,
unsharded sequence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dcpd.attention.local_group import LocalDCPGroup, StepRequest
from dcpd.batch import AllReduceStrategy, DCPPlanConfig

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: list[int], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Lq, Hq, D], k/v [Lk, Hkv, D]; query i sees keys 0..q_positions[i]. float64 out [Lq, Hq, D], lse [Lq, Hq]."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    keys = torch.arange(k.shape[0])
    visible = keys[None, :] <= torch.tensor(q_positions)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v64)
    return out, lse.transpose(0, 1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA over one request's new tokens (no context): q [L, Hq, D] -> [L, Hq, D]."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(0, 1)


@dataclass
class SimRequest:
    rid: str
    q: torch.Tensor  # [total, Hq, D] float64, query of every position
    k: torch.Tensor  # [total, Hkv, D]
    v: torch.Tensor
    num_prompt: int
    computed: int = 0


class DCPSim:
    """Random requests on a `LocalDCPGroup`, checked against `naive_attention`."""

    def __init__(
        self,
        *,
        dcp_size: int = 1,
        interleave: int = 1,
        block_size: int = 16,
        num_blocks: int = 512,
        num_q_heads: int = 4,
        num_kv_heads: int = 2,
        head_dim: int = 32,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
        strategy: AllReduceStrategy = AllReduceStrategy.LSE_AG_ALL_REDUCE,
        fragment: bool = False,
        seed: int = 0,
        num_layers: int = 1,
        max_tokens_per_batch: int = 8192,
    ) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.hq, self.hkv, self.d = num_q_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.requests: dict[str, SimRequest] = {}
        config = DCPPlanConfig(
            block_size=block_size,
            dcp_size=dcp_size,
            interleave_size=interleave,
            all_reduce_strategy=strategy,
            max_tokens_per_batch=max_tokens_per_batch,
        )
        self.group = LocalDCPGroup(
            config,
            num_layers=num_layers,
            num_blocks=num_blocks,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            backend=backend,
        )
        self.ranks = self.group.ranks
        if fragment:  # pin a random 40% of each pool so that requests get scattered blocks
            for rank in self.ranks:
                ids = rank.cache.pool.allocate(num_blocks)
                self.rng.shuffle(ids)
                rank.cache.pool.free(ids[: num_blocks * 6 // 10])

    def add(self, rid: str, total: int, num_prompt: int | None = None) -> None:
        def rand(heads: int) -> torch.Tensor:
            return torch.randn(total, heads, self.d, generator=self.gen, dtype=torch.float64)

        self.requests[rid] = SimRequest(rid, rand(self.hq), rand(self.hkv), rand(self.hkv), num_prompt or total)

    def step(self, chunks: dict[str, int], wrapper: str, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Compute `chunks[rid]` new tokens per request on all ranks; return rank 0's out, lse and references."""
        step = [
            StepRequest(
                rid,
                list(range(self.requests[rid].q.shape[0])),
                self.requests[rid].num_prompt,
                self.requests[rid].computed,
                n,
            )
            for rid, n in chunks.items()
        ]
        q, k, v = self._inputs(chunks)
        out, lse = self.group.forward(step, layer, q, k, v, wrapper=wrapper)[0]  # type: ignore[arg-type]
        refs = []
        for rid, n in chunks.items():
            req = self.requests[rid]
            positions = list(range(req.computed, req.computed + n))
            seq = req.computed + n
            q_ref, k_ref, v_ref = (self._round(t) for t in (req.q[positions], req.k[:seq], req.v[:seq]))
            refs.append(naive_attention(q_ref, k_ref, v_ref, positions, self.scale))
            req.computed += n
        return out, lse, refs

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype).double()

    def _inputs(self, chunks: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = {"q": [], "k": [], "v": []}
        for rid, n in chunks.items():
            req = self.requests[rid]
            rows = slice(req.computed, req.computed + n)
            parts["q"].append(req.q[rows])
            parts["k"].append(req.k[rows])
            parts["v"].append(req.v[rows])
        return tuple(torch.cat(parts[name]).to(self.dtype) for name in ("q", "k", "v"))  # type: ignore[return-value]

    def check(self, out: torch.Tensor, lse: torch.Tensor, refs: list, head_slice: slice = slice(None)) -> None:
        ref_out = torch.cat([r[0] for r in refs])[:, head_slice]
        ref_lse = torch.cat([r[1] for r in refs])[:, head_slice]
        tol = TOLERANCE[self.dtype]
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), ref_lse, atol=tol * 4, rtol=tol)

    def free_all(self) -> None:
        """Free every request's blocks; returns the pools to their state before any request."""
        for rid in self.requests:
            self.group.free(rid)
