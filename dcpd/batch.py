"""The batch data model shared by the scheduler and the attention wrappers.

`BatchRequest` / `BatchMetadata` describe what a step computes; `DCPPlanConfig`
holds the limits and the DCP layout; `ExecutionPlan` is what `plan()` builds
once per step and every layer's `run()` reuses.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class PlanError(ValueError):
    """A batch, plan or run input that cannot be executed; the message names the problem."""


class BatchPhase(enum.Enum):
    """What a batch (or one request in it) is doing this step."""

    PREFILL = "prefill"  # computing prompt tokens (possibly one chunk of them)
    DECODE = "decode"  # one new token per request against its cached context
    MIXED = "mixed"  # some requests prefilling, some decoding


class AllReduceStrategy(enum.Enum):
    """How the partial attention results of the DCP ranks are merged.

    ALL_GATHER_MERGE: all-gather (out, lse) from every rank, merge locally.
    LSE_AG_ALL_REDUCE: all-gather only the LSE, rescale the local output by
        exp(lse_local - lse_global), then all-reduce (sum) the outputs.
    LSE_AG_REDUCE_SCATTER: as above, but reduce-scatter over heads so that
        rank r keeps head slice r (vLLM's `cp_lse_ag_out_rs`).
    """

    ALL_GATHER_MERGE = "all_gather_merge"
    LSE_AG_ALL_REDUCE = "lse_ag_all_reduce"
    LSE_AG_REDUCE_SCATTER = "lse_ag_reduce_scatter"


@dataclass
class BatchRequest:
    """One request's state inside a batch.

    `token_ids` holds every token known so far (prompt, then generated). This
    step computes tokens `num_computed_tokens .. num_computed_tokens + num_new_tokens - 1`
    (their KV is written to the cache); everything before them is already cached.
    `block_ids` is this rank's block table for the request.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    num_new_tokens: int | None = None  # None: every token not yet computed
    block_ids: list[int] = field(default_factory=list)
    # Disaggregation: where the KV goes (prefill side) or comes from (decode side).
    remote_peer: str | None = None
    remote_block_ids: list[int] | None = None

    @property
    def query_len(self) -> int:
        if self.num_new_tokens is None:
            return len(self.token_ids) - self.num_computed_tokens
        return self.num_new_tokens

    @property
    def seq_len(self) -> int:
        """Tokens in the KV cache once this step has run."""
        return self.num_computed_tokens + self.query_len

    @property
    def phase(self) -> BatchPhase:
        if self.num_computed_tokens >= self.num_prompt_tokens:
            return BatchPhase.DECODE
        return BatchPhase.PREFILL

    def validate(self) -> None:
        rid = self.request_id
        if self.num_prompt_tokens < 1:
            raise PlanError(f"request {rid!r}: num_prompt_tokens must be >= 1, got {self.num_prompt_tokens}")
        if self.num_computed_tokens < 0:
            raise PlanError(f"request {rid!r}: num_computed_tokens must be >= 0, got {self.num_computed_tokens}")
        if self.query_len < 1:
            raise PlanError(f"request {rid!r}: no new tokens to compute (query_len={self.query_len})")
        if self.seq_len > len(self.token_ids):
            raise PlanError(
                f"request {rid!r}: computes up to token {self.seq_len} but has only {len(self.token_ids)} token ids"
            )


@dataclass(frozen=True)
class BatchMetadata:
    """Per-batch counts and ragged lengths, in request order (host side)."""

    request_ids: tuple[str, ...]
    phases: tuple[BatchPhase, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]  # tokens already cached before this step
    seq_lens: tuple[int, ...]  # context_lens + query_lens
    query_start_loc: tuple[int, ...]  # exclusive prefix sum of query_lens, length B + 1

    @classmethod
    def from_requests(cls, requests: Sequence[BatchRequest]) -> BatchMetadata:
        query_lens = tuple(r.query_len for r in requests)
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(
            request_ids=tuple(r.request_id for r in requests),
            phases=tuple(r.phase for r in requests),
            query_lens=query_lens,
            context_lens=tuple(r.num_computed_tokens for r in requests),
            seq_lens=tuple(r.seq_len for r in requests),
            query_start_loc=tuple(starts),
        )

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def num_prefill(self) -> int:
        return sum(p is BatchPhase.PREFILL for p in self.phases)

    @property
    def num_decode(self) -> int:
        return sum(p is BatchPhase.DECODE for p in self.phases)

    def is_prefill(self) -> bool:
        """True when every request in the batch is prefilling."""
        return self.num_requests > 0 and self.num_decode == 0

    def is_decode(self) -> bool:
        """True when every request in the batch is decoding."""
        return self.num_requests > 0 and self.num_prefill == 0

    @property
    def phase(self) -> BatchPhase:
        if self.is_decode():
            return BatchPhase.DECODE
        if self.is_prefill():
            return BatchPhase.PREFILL
        return BatchPhase.MIXED


def _check(condition: bool, name: str, value: object, rule: str) -> None:
    if not condition:
        raise ValueError(f"DCPPlanConfig.{name}={value!r}: {rule}")


@dataclass(frozen=True)
class DCPPlanConfig:
    """Batch limits, KV-cache sizing and DCP layout. Invalid values raise ValueError naming the field."""

    max_batch_size: int = 256
    max_tokens_per_batch: int = 8192
    block_size: int = 16
    kv_cache_bytes: int = 256 * 1024 * 1024  # KV memory of this rank, all layers
    kv_reserve_fraction: float = 0.05  # blocks only running requests may take (never new admissions)
    dcp_size: int = 1
    dcp_rank: int = 0
    interleave_size: int = 1  # consecutive tokens placed on one DCP rank; 1 or a divisor of block_size
    all_reduce_strategy: AllReduceStrategy = AllReduceStrategy.LSE_AG_ALL_REDUCE

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tokens_per_batch", "block_size", "kv_cache_bytes", "dcp_size"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an integer")
            _check(value >= 1, name, value, "must be >= 1")
        reserve = self.kv_reserve_fraction
        _check(
            isinstance(reserve, (int, float)) and not isinstance(reserve, bool) and 0.0 <= reserve < 1.0,
            "kv_reserve_fraction",
            reserve,
            "must be a number in [0, 1)",
        )
        _check(
            isinstance(self.dcp_rank, int)
            and not isinstance(self.dcp_rank, bool)
            and 0 <= self.dcp_rank < self.dcp_size,
            "dcp_rank",
            self.dcp_rank,
            f"must be in [0, dcp_size={self.dcp_size})",
        )
        _check(
            isinstance(self.interleave_size, int)
            and not isinstance(self.interleave_size, bool)
            and self.interleave_size >= 1
            and self.block_size % self.interleave_size == 0,
            "interleave_size",
            self.interleave_size,
            f"must be a positive divisor of block_size={self.block_size}",
        )
        _check(
            isinstance(self.all_reduce_strategy, AllReduceStrategy),
            "all_reduce_strategy",
            self.all_reduce_strategy,
            f"must be one of {[s.value for s in AllReduceStrategy]}",
        )


@dataclass(frozen=True)
class RequestRuns:
    """Where one request's rank-local KV lives, as runs of consecutive blocks.

    A run (first_block, num_tokens) is a zero-copy view of the head-major cache;
    attention is computed per run and the runs are merged exactly by LSE.
    `context` covers the rank-local tokens cached before this step (prefill
    attends to them non-causally); `sequence` covers every rank-local token
    once this step's writes are done (decode attends to them).
    """

    context: tuple[tuple[int, int], ...]
    sequence: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ExecutionPlan:
    """Everything `run()` needs for one step, built once by `plan()` and reused by every layer.

    Device tensors (on the cache's device):
      qo_indptr        [B+1]  start of each request's new tokens in q/k/v
      positions        [T]    global position of each new token (RoPE uses it)
      slot_mapping     [T]    rank-local cache slot (block * block_size + offset) of each
                              new token, -1 where another DCP rank stores it
      write_token_idx  [W]    the new tokens this rank stores ...
      write_slots      [W]    ... and their slots (the compact form of slot_mapping)
      paged_kv_indptr  [B+1]  FlashInfer-style CSR of the rank-local block table
      paged_kv_indices [nnz]  (after this step's writes)
      paged_kv_last_page_len [B]
      block_table      [B, max_blocks]  padded with -1
      seq_lens / context_lens / query_lens [B]  global lengths
      local_seq_lens / local_context_lens  [B]  this DCP rank's share
    Host side (no device sync in run()): the query start offsets, the block runs,
    and for DCP prefill which requests' causal new-token block this rank computes.
    """

    phase: BatchPhase
    request_ids: tuple[str, ...]
    num_tokens: int
    dcp_size: int
    dcp_rank: int
    interleave_size: int
    block_size: int
    qo_indptr: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    write_token_idx: torch.Tensor
    write_slots: torch.Tensor
    paged_kv_indptr: torch.Tensor
    paged_kv_indices: torch.Tensor
    paged_kv_last_page_len: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    context_lens: torch.Tensor
    query_lens: torch.Tensor
    local_seq_lens: torch.Tensor
    local_context_lens: torch.Tensor
    # host-side mirrors
    query_start_loc_host: tuple[int, ...]
    runs: tuple[RequestRuns, ...]
    computes_new_block: tuple[bool, ...]
    writes_all_tokens: bool  # every new token is stored on this rank (dcp_size == 1)

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)
