"""merge_states and the AllReduceStrategy reference math."""

from __future__ import annotations

import pytest
import torch

from dcpd.attention.merge import global_lse, merge_partials, merge_state_pair, merge_states, reduce_reference
from dcpd.batch import AllReduceStrategy

INF = float("inf")


def partial(scores: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention partial over a key subset: scores [T, H, K], values [K, H, D] -> out [T, H, D], lse [T, H]."""
    lse = torch.logsumexp(scores, -1)
    weights = torch.softmax(scores, -1)
    weights = torch.nan_to_num(weights, nan=0.0)
    return torch.einsum("thk,khd->thd", weights, values), lse


def split_keys(n_keys: int, parts: int, gen: torch.Generator) -> list[torch.Tensor]:
    owner = torch.randint(0, parts, (n_keys,), generator=gen)
    return [torch.nonzero(owner == p).flatten() for p in range(parts)]


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_n_way_merge_equals_full_softmax(parts: int) -> None:
    gen = torch.Generator().manual_seed(parts)
    scores = torch.randn(7, 4, 50, generator=gen, dtype=torch.float64) * 3
    values = torch.randn(50, 4, 8, generator=gen, dtype=torch.float64)
    full_out, full_lse = partial(scores, values)
    pieces = [partial(scores[..., idx], values[idx]) for idx in split_keys(50, parts, gen)]
    out, lse = merge_states(torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces]))
    torch.testing.assert_close(out, full_out)
    torch.testing.assert_close(lse.double(), full_lse, atol=1e-6, rtol=1e-6)
    out2, lse2 = merge_partials(pieces)
    torch.testing.assert_close(lse2.double(), full_lse, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out2, full_out)
    if parts == 2:
        out3, _ = merge_state_pair(pieces[0][0], pieces[0][1], pieces[1][0], pieces[1][1])
        torch.testing.assert_close(out3, full_out)


def test_empty_shards_contribute_nothing_and_never_nan() -> None:
    gen = torch.Generator().manual_seed(0)
    out_a = torch.randn(3, 2, 4, generator=gen)
    lse_a = torch.randn(3, 2, generator=gen)
    empty_out, empty_lse = torch.zeros(3, 2, 4), torch.full((3, 2), -INF)
    out, lse = merge_state_pair(out_a, lse_a, empty_out, empty_lse)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    # NaN or +inf LSE from a broken shard counts as empty too
    out, lse = merge_states(torch.stack([out_a, empty_out]), torch.stack([lse_a, torch.full((3, 2), float("nan"))]))
    torch.testing.assert_close(out, out_a)
    # every shard empty: zeros and -inf, no NaN
    out, lse = merge_states(torch.stack([empty_out, empty_out]), torch.stack([empty_lse, empty_lse]))
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_merge_is_stable_for_huge_lse() -> None:
    out_a, out_b = torch.ones(1, 1, 2), 3 * torch.ones(1, 1, 2)
    out, lse = merge_state_pair(out_a, torch.tensor([[1000.0]]), out_b, torch.tensor([[1000.0]]))
    torch.testing.assert_close(out, 2 * torch.ones(1, 1, 2))
    torch.testing.assert_close(lse, torch.tensor([[1000.0 + torch.log(torch.tensor(2.0)).item()]]))


def test_global_lse_is_order_independent() -> None:
    gen = torch.Generator().manual_seed(1)
    lses = torch.randn(4, 5, 3, generator=gen)
    lses[2, 1] = -INF
    torch.testing.assert_close(global_lse(lses), global_lse(lses.flip(0)))


@pytest.mark.parametrize("strategy", list(AllReduceStrategy))
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_reduce_reference_strategies_agree(strategy: AllReduceStrategy, ranks: int) -> None:
    gen = torch.Generator().manual_seed(ranks)
    scores = torch.randn(6, 4, 40, generator=gen, dtype=torch.float64)
    values = torch.randn(40, 4, 8, generator=gen, dtype=torch.float64)
    full_out, full_lse = partial(scores, values)
    pieces = [partial(scores[..., idx], values[idx]) for idx in split_keys(40, ranks, gen)]
    results = reduce_reference(strategy, pieces)
    assert len(results) == ranks
    for r, (out, lse) in enumerate(results):
        heads = slice(None)
        if strategy is AllReduceStrategy.LSE_AG_REDUCE_SCATTER:
            heads = slice(r * 4 // ranks, (r + 1) * 4 // ranks)
        torch.testing.assert_close(out, full_out[:, heads])
        torch.testing.assert_close(lse.double(), full_lse[:, heads], atol=1e-6, rtol=1e-6)


def test_reduce_scatter_needs_divisible_heads() -> None:
    pieces = [(torch.zeros(2, 3, 4), torch.zeros(2, 3)) for _ in range(2)]
    with pytest.raises(ValueError, match="num_heads=3 divisible by dcp_size=2"):
        reduce_reference(AllReduceStrategy.LSE_AG_REDUCE_SCATTER, pieces)
    with pytest.raises(ValueError, match="at least one"):
        reduce_reference(AllReduceStrategy.ALL_GATHER_MERGE, [])
