"""A DCP group simulated in one process: the single-process reference of distributed DCP.

Each rank has its own KV cache, block pool and wrappers, exactly as a real rank
would; `forward()` plans the batch on every rank, runs one layer on every rank
and merges the partial results with the configured `AllReduceStrategy`'s
reference math. Tests, the demo and (later) the torch.distributed path compare
against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dcpd.attention.dcp import local_length
from dcpd.attention.merge import reduce_reference
from dcpd.attention.wrappers import BatchDCPDecodeWrapper, BatchDCPPrefillWrapper, UnifiedBatchWrapper
from dcpd.batch import BatchRequest, DCPPlanConfig
from dcpd.kv.cache import PagedKVCache

WrapperKind = Literal["prefill", "decode", "unified"]


@dataclass
class RankState:
    cache: PagedKVCache
    prefill: BatchDCPPrefillWrapper
    decode: BatchDCPDecodeWrapper
    unified: UnifiedBatchWrapper
    block_tables: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRequest:
    """One request's share of a step: tokens [num_computed, num_computed + num_new)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    num_new_tokens: int


class LocalDCPGroup:
    def __init__(
        self,
        config: DCPPlanConfig,
        *,
        num_layers: int,
        num_blocks: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
    ) -> None:
        self.config = config
        self.ranks: list[RankState] = []
        for rank in range(config.dcp_size):
            rank_config = dataclasses.replace(config, dcp_rank=rank)
            cache = PagedKVCache(
                num_layers, num_blocks, config.block_size, num_kv_heads, head_dim, dtype=dtype, device=device
            )
            self.ranks.append(
                RankState(
                    cache,
                    BatchDCPPrefillWrapper(rank_config, cache, num_q_heads, backend=backend),
                    BatchDCPDecodeWrapper(rank_config, cache, num_q_heads, backend=backend),
                    UnifiedBatchWrapper(rank_config, cache, num_q_heads, backend=backend),
                )
            )

    def reserve(self, request_id: str, num_tokens: int) -> None:
        """Grow the request's block table on every rank to hold its first `num_tokens` tokens."""
        cfg = self.config
        for rank, state in enumerate(self.ranks):
            table = state.block_tables.setdefault(request_id, [])
            need = -(-local_length(num_tokens, rank, cfg.dcp_size, cfg.interleave_size) // cfg.block_size)
            if need > len(table):
                table.extend(state.cache.pool.allocate(need - len(table), after=table[-1] if table else None))

    def free(self, request_id: str) -> None:
        for state in self.ranks:
            state.cache.pool.free(state.block_tables.pop(request_id, []))

    def batch_for_rank(self, rank: int, step: Sequence[StepRequest]) -> list[BatchRequest]:
        tables = self.ranks[rank].block_tables
        return [
            BatchRequest(
                request_id=s.request_id,
                token_ids=s.token_ids,
                num_prompt_tokens=s.num_prompt_tokens,
                num_computed_tokens=s.num_computed_tokens,
                num_new_tokens=s.num_new_tokens,
                block_ids=list(tables.get(s.request_id, [])),
            )
            for s in step
        ]

    def forward(
        self,
        step: Sequence[StepRequest],
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        wrapper: WrapperKind = "unified",
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Reserve blocks, plan and run one layer on every rank, then reduce: one (out, lse) per rank."""
        for s in step:
            self.reserve(s.request_id, s.num_computed_tokens + s.num_new_tokens)
        partials = []
        for rank, state in enumerate(self.ranks):
            executor = getattr(state, wrapper)
            plan = executor.plan(self.batch_for_rank(rank, step))
            partials.append(executor.run(plan, layer, q, k, v, return_lse=True))
        return reduce_reference(self.config.all_reduce_strategy, partials)
