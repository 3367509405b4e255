"""Host-side planning: turn a batch of requests into an `ExecutionPlan` (once per step)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dcpd.attention.dcp import local_index, local_length, owner_ranks
from dcpd.batch import BatchMetadata, BatchPhase, BatchRequest, DCPPlanConfig, ExecutionPlan, PlanError, RequestRuns


def block_runs(block_ids: Sequence[int], num_tokens: int, block_size: int) -> tuple[tuple[int, int], ...]:
    """Split the first `num_tokens` tokens of a block table into runs of consecutive block ids.

    Returns (first_block, tokens_in_run) pairs in token order.
    """
    runs: list[tuple[int, int]] = []
    if num_tokens <= 0:
        return ()
    num_blocks = -(-num_tokens // block_size)
    start = block_ids[0]
    length = 1
    for block in block_ids[1:num_blocks]:
        if block == start + length:
            length += 1
        else:
            runs.append((start, length * block_size))
            start, length = block, 1
    runs.append((start, length * block_size))
    # the last block may be partly filled
    overshoot = num_blocks * block_size - num_tokens
    first, tokens = runs[-1]
    runs[-1] = (first, tokens - overshoot)
    return tuple(runs)


def check_batch_limits(num_requests: int, num_tokens: int, config: DCPPlanConfig) -> None:
    if num_requests == 0:
        raise PlanError("cannot plan an empty batch")
    if num_requests > config.max_batch_size:
        raise PlanError(f"batch has {num_requests} requests; max_batch_size is {config.max_batch_size}")
    if num_tokens > config.max_tokens_per_batch:
        raise PlanError(f"batch has {num_tokens} new tokens; max_tokens_per_batch is {config.max_tokens_per_batch}")


def check_unique_ids(requests: Sequence[BatchRequest]) -> None:
    seen: set[str] = set()
    for req in requests:
        if req.request_id in seen:
            raise PlanError(f"request id {req.request_id!r} appears twice in the batch")
        seen.add(req.request_id)


def validate_metadata(requests: Sequence[BatchRequest], metadata: BatchMetadata) -> None:
    derived = BatchMetadata.from_requests(requests)
    for name in ("request_ids", "phases", "query_lens", "context_lens", "seq_lens", "query_start_loc"):
        given, expected = getattr(metadata, name), getattr(derived, name)
        if tuple(given) != tuple(expected):
            raise PlanError(f"BatchMetadata.{name}={list(given)} does not match the requests ({list(expected)})")


def build_plan(
    requests: Sequence[BatchRequest],
    metadata: BatchMetadata | None,
    config: DCPPlanConfig,
    *,
    num_blocks: int,
    device: torch.device,
    phase: BatchPhase,
) -> ExecutionPlan:
    """Validate a batch and build this DCP rank's plan for it. Raises PlanError naming the problem."""
    check_batch_limits(len(requests), 0, config)
    for req in requests:
        req.validate()
    check_unique_ids(requests)
    if metadata is None:
        metadata = BatchMetadata.from_requests(requests)
    else:
        validate_metadata(requests, metadata)
    check_batch_limits(len(requests), metadata.num_tokens, config)

    n, rank, inter, bs = config.dcp_size, config.dcp_rank, config.interleave_size, config.block_size
    local_ctx = [local_length(c, rank, n, inter) for c in metadata.context_lens]
    local_seq = [local_length(s, rank, n, inter) for s in metadata.seq_lens]
    runs: list[RequestRuns] = []
    for req, lc, ls in zip(requests, local_ctx, local_seq):
        needed = -(-ls // bs)
        if len(req.block_ids) < needed:
            raise PlanError(
                f"request {req.request_id!r}: block table has {len(req.block_ids)} blocks, "
                f"needs {needed} for {ls} tokens on DCP rank {rank}"
            )
        for block in req.block_ids[:needed]:
            if not isinstance(block, int) or isinstance(block, bool) or not 0 <= block < num_blocks:
                raise PlanError(
                    f"request {req.request_id!r}: block id {block!r} is not a block of the cache (0..{num_blocks - 1})"
                )
        if len(set(req.block_ids[:needed])) != needed:
            raise PlanError(f"request {req.request_id!r}: its block table lists a block twice")
        runs.append(RequestRuns(context=block_runs(req.block_ids, lc, bs), sequence=block_runs(req.block_ids, ls, bs)))

    num_req = len(requests)
    query_lens = torch.tensor(metadata.query_lens, dtype=torch.long)
    context_lens = torch.tensor(metadata.context_lens, dtype=torch.long)
    qo_indptr = torch.tensor(metadata.query_start_loc, dtype=torch.long)
    # Global position of every new token: context_len + offset within the request's chunk.
    token_req = torch.repeat_interleave(torch.arange(num_req), query_lens)
    positions = torch.arange(metadata.num_tokens) - qo_indptr[token_req] + context_lens[token_req]

    blocks_needed = [-(-ls // bs) for ls in local_seq]
    width = max(max(blocks_needed), 1)
    block_table = torch.full((num_req, width), -1, dtype=torch.long)
    for i, (req, nb) in enumerate(zip(requests, blocks_needed)):
        if nb:
            block_table[i, :nb] = torch.tensor(req.block_ids[:nb], dtype=torch.long)

    mine = owner_ranks(positions, n, inter) == rank
    write_token_idx = torch.nonzero(mine).flatten()
    local_pos = local_index(positions[write_token_idx], n, inter)
    write_slots = block_table[token_req[write_token_idx], local_pos // bs] * bs + local_pos % bs
    if write_slots.unique().numel() != write_slots.numel():
        raise PlanError("two requests in the batch write into the same KV block")
    slot_mapping = torch.full((metadata.num_tokens,), -1, dtype=torch.long)
    slot_mapping[write_token_idx] = write_slots

    blocks_needed_t = torch.tensor(blocks_needed, dtype=torch.long)
    paged_kv_indptr = torch.zeros(num_req + 1, dtype=torch.long)
    paged_kv_indptr[1:] = torch.cumsum(blocks_needed_t, 0)
    paged_kv_indices = block_table[block_table >= 0]  # row-major: request order, then block order
    local_seq_t = torch.tensor(local_seq, dtype=torch.long)
    last_page_len = torch.where(blocks_needed_t > 0, local_seq_t - (blocks_needed_t - 1) * bs, 0)

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return ExecutionPlan(
        phase=phase,
        request_ids=metadata.request_ids,
        num_tokens=metadata.num_tokens,
        dcp_size=n,
        dcp_rank=rank,
        interleave_size=inter,
        block_size=bs,
        qo_indptr=dev(qo_indptr),
        positions=dev(positions),
        slot_mapping=dev(slot_mapping),
        write_token_idx=dev(write_token_idx),
        write_slots=dev(write_slots),
        paged_kv_indptr=dev(paged_kv_indptr),
        paged_kv_indices=dev(paged_kv_indices),
        paged_kv_last_page_len=dev(last_page_len),
        block_table=dev(block_table),
        seq_lens=dev(torch.tensor(metadata.seq_lens, dtype=torch.long)),
        context_lens=dev(context_lens),
        query_lens=dev(query_lens),
        local_seq_lens=dev(local_seq_t),
        local_context_lens=dev(torch.tensor(local_ctx, dtype=torch.long)),
        query_start_loc_host=metadata.query_start_loc,
        runs=tuple(runs),
        # DCP prefill: the causal block over a request's new tokens is computed by exactly
        # one rank (round-robin by batch index) so that the N-way LSE merge counts it once.
        computes_new_block=tuple(i % n == rank for i in range(num_req)),
        writes_all_tokens=n == 1,
    )
