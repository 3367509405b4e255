"""Exact merging of partial attention results by log-sum-exp (natural log).

A partial result over key set S is (o_S, lse_S) with o_S = softmax-weighted sum
of values in S and lse_S = log(sum_{j in S} exp(s_j)). For disjoint S_1..S_N:
    lse = log(sum_i exp(lse_i)),  o = sum_i exp(lse_i - lse) * o_i.
Empty key sets have lse = -inf and contribute nothing; if every set is empty
the result is o = 0, lse = -inf (never NaN).

Shapes: out [..., H, D], lse [..., H]; stacked inputs add a leading rank dim N.
The all-reduce strategies below are the single-process reference math of what
each DCP rank computes; the distributed version runs the same local steps
around real collectives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dcpd.batch import AllReduceStrategy


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 for float64 inputs: merges never compute in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _finite_or_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    lse = _wide(lse)
    return torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("-inf")))


def merge_weights(lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of stacked partials [N, ...] in the merged output, and the merged LSE.

    w_i = exp(lse_i - m) / sum_j exp(lse_j - m) with m = max_j lse_j: only LSE
    differences are exponentiated, so large LSEs lose no precision. NaN/inf LSEs
    count as empty shards; if every shard is empty all weights are 0 and lse = -inf.
    """
    lses = _finite_or_neg_inf(lses)
    peak = lses.amax(dim=0)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    scaled = torch.exp(lses - peak)
    total = scaled.sum(dim=0)
    weights = torch.where(total > 0, scaled / total, torch.zeros_like(scaled))
    return weights, peak + torch.log(total)


def global_lse(lses: torch.Tensor) -> torch.Tensor:
    """Max-stabilised log-sum-exp over dim 0 of stacked LSEs [N, ...]; NaN/inf count as empty."""
    return merge_weights(lses)[1]


def rescale_partial(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One rank's share of the merged output, out * weight (float32, or float64 for float64 inputs).

    Summing the rescaled partials of all ranks (the all-reduce) gives the merged output.
    """
    return _wide(out) * weight.unsqueeze(-1).to(torch.promote_types(out.dtype, torch.float32))


def merge_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """N-way merge: outs [N, ..., H, D], lses [N, ..., H] -> (out [..., H, D] in outs.dtype, lse)."""
    return merge_partials(list(zip(outs.unbind(0), lses.unbind(0))))


def merge_state_pair(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-way merge of partial results over disjoint key sets."""
    return merge_partials([(out_a, lse_a), (out_b, lse_b)])


def merge_partials(partials: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of (out, lse) partials over disjoint key sets."""
    if len(partials) == 1:
        out, lse = partials[0]
        return out, _finite_or_neg_inf(lse)
    weights, lse = merge_weights(torch.stack([p[1] for p in partials]))
    merged = rescale_partial(partials[0][0], weights[0])
    for (out, _), weight in zip(partials[1:], weights[1:]):
        merged += rescale_partial(out, weight)
    return merged.to(partials[0][0].dtype), lse


def merge_nonempty_partials(
    partials: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hot-path merge for kernel outputs over non-empty key sets (every LSE finite).

    The same math as `merge_partials` with the NaN/empty handling left out; the
    wrappers only call it with partials they computed over at least one key.
    """
    if len(partials) == 1:
        return partials[0]
    lses = torch.stack([p[1] for p in partials])
    peak = lses.amax(dim=0)
    weights = torch.exp(lses - peak)
    total = weights.sum(dim=0)
    merged = partials[0][0].float() * weights[0].unsqueeze(-1)
    for (out, _), weight in zip(partials[1:], weights[1:]):
        merged.addcmul_(out.float(), weight.unsqueeze(-1))
    merged /= total.unsqueeze(-1)
    return merged.to(partials[0][0].dtype), peak + torch.log(total)


def reduce_reference(
    strategy: AllReduceStrategy, partials: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What each of the N ranks holds after the DCP reduction, computed in one process.

    `partials[r]` is rank r's (out [T, H, D], lse [T, H]). Returns one (out, lse)
    per rank: the full merged result, or for LSE_AG_REDUCE_SCATTER rank r's head
    slice r (H must be divisible by N).
    """
    n = len(partials)
    if n == 0:
        raise ValueError("reduce_reference needs at least one partial result")
    if strategy is AllReduceStrategy.ALL_GATHER_MERGE:
        gathered_out = torch.stack([p[0] for p in partials])  # all-gather of outputs
        gathered_lse = torch.stack([p[1] for p in partials])  # all-gather of LSEs
        merged = merge_states(gathered_out, gathered_lse)
        return [merged for _ in range(n)]
    gathered_lse = torch.stack([p[1] for p in partials])  # all-gather of LSEs only
    weights, lse = merge_weights(gathered_lse)  # every rank computes this from the gathered LSEs
    scaled = [rescale_partial(out, weights[r]) for r, (out, _) in enumerate(partials)]
    total = torch.stack(scaled).sum(dim=0).to(partials[0][0].dtype)  # the all-reduce (sum)
    if strategy is AllReduceStrategy.LSE_AG_ALL_REDUCE:
        return [(total, lse) for _ in range(n)]
    num_heads = total.shape[-2]
    if num_heads % n != 0:
        raise ValueError(f"reduce-scatter over heads needs num_heads={num_heads} divisible by dcp_size={n}")
    out_slices = total.chunk(n, dim=-2)
    lse_slices = lse.chunk(n, dim=-1)
    return [(out_slices[r], lse_slices[r]) for r in range(n)]
