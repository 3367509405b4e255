"""Attention kernels that return the log-sum-exp, on one request at a time.

Layout for one call: q [Hq, Lq, D], k / v [Hkv, Lk, D] (any strides, unit
stride in D is fastest), Hq a multiple of Hkv (GQA/MQA). Returns
out [Hq, Lq, D] in q's dtype and lse [Hq, Lq] in float32 (natural log).

Backends:
  "flash": torch's fused CPU flash-attention op, which returns the LSE at SDPA
           speed (`aten._scaled_dot_product_flash_attention_for_cpu`).
  "math":  matmul + softmax in float32 (float64 for float64 inputs); runs on
           any device and is the fallback off CPU.
"""

from __future__ import annotations

from typing import Literal

import torch

Backend = Literal["flash", "math"]
BACKENDS: tuple[str, ...] = ("auto", "flash", "math")

_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def resolve_backend(requested: str, device: torch.device) -> Backend:
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r}: must be one of {BACKENDS}")
    if requested == "auto":
        return "flash" if device.type == "cpu" and _flash_cpu is not None else "math"
    if requested == "flash" and (device.type != "cpu" or _flash_cpu is None):
        raise ValueError(f"attention backend 'flash' needs a CPU device and torch's CPU flash op (device={device})")
    return requested  # type: ignore[return-value]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over (k, v) with its LSE. `causal` needs Lq == Lk (query i sees keys <= i)."""
    num_keys = k.shape[1]
    if num_keys == 0:  # no keys: an empty partial (the CPU flash op would divide by zero)
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), device=q.device)
    if causal and q.shape[1] != num_keys:
        raise ValueError(f"causal attention needs as many keys as queries (Lq={q.shape[1]}, Lk={num_keys})")
    if backend == "flash":
        out, lse = _flash_cpu(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal, scale=scale)
        return out[0], lse[0]
    return attend_math(q, k, v, causal=causal, scale=scale)


def attend_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[0] // k.shape[0]
    kf = k.to(compute).repeat_interleave(group, dim=0)
    vf = v.to(compute).repeat_interleave(group, dim=0)
    scores = torch.matmul(q.to(compute), kf.transpose(-1, -2)) * scale  # [Hq, Lq, Lk]
    if causal:
        lq, lk = scores.shape[-2:]
        future = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(lk - lq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = torch.matmul(torch.exp(scores - safe.unsqueeze(-1)), vf)
    return out.to(q.dtype), lse.float()
