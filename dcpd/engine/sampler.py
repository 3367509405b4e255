"""Vectorised sampling over a batch: greedy, temperature, top-k, top-p, per-request seeds.

Each sampled row draws one uniform number (from its own seeded generator, or a
shared one) and picks a token by inverse CDF over the filtered, sorted
distribution, so a seeded request gets the same tokens whatever it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dcpd.engine.request import Request


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """logits [n, vocab] float32 (one row per request) -> one token id per request."""
        greedy_tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if not sampled_rows:
            return greedy_tokens.tolist()
        rows = torch.tensor(sampled_rows)
        params = [requests[i].params for i in sampled_rows]
        temps = torch.tensor([p.temperature for p in params], dtype=torch.float32)
        probs = torch.softmax(logits[rows] / temps[:, None], dim=-1)
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params])  # >= vocab: off
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
        ranks = torch.arange(vocab)[None, :]
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more likely tokens
        keep = (ranks < top_k[:, None]) & (before < top_p[:, None])
        keep[:, 0] = True
        filtered = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        cdf = filtered.cumsum(dim=-1)
        uniforms = torch.empty(len(params))
        unseeded = [j for j, i in enumerate(sampled_rows) if requests[i].generator is None]
        if unseeded:
            uniforms[unseeded] = torch.rand(len(unseeded), generator=self.generator)
        for j, i in enumerate(sampled_rows):
            gen = requests[i].generator
            if gen is not None:
                uniforms[j] = torch.rand(1, generator=gen)[0]
        targets = (uniforms * cdf[:, -1]).unsqueeze(1)
        picks = torch.searchsorted(cdf, targets, right=True).clamp_max(vocab - 1)
        # never land on a filtered-out (zero-mass) tail position
        picks = torch.minimum(picks, keep.sum(dim=-1, keepdim=True) - 1)
        chosen = sorted_ids.gather(1, picks).squeeze(1)
        tokens = greedy_tokens.clone()
        tokens[rows] = chosen
        return tokens.tolist()
