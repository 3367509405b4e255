"""The batch executors: `plan()` once per step, `run()` once per layer.

`BatchDCPPrefillWrapper`: chunked prefill. Each request's new tokens attend
causally to themselves (straight from the q/k/v inputs) and non-causally to the
context already in the paged cache; the parts are merged by LSE.

`BatchDCPDecodeWrapper`: one new token per request, attending to its whole
paged sequence (the new token's KV is written first).

Under DCP (dcp_size N > 1) each rank stores and attends over its own shard of
every sequence and returns (out, lse) partials; merging the N partials
(`dcpd.attention.merge.reduce_reference`, or the distributed collectives)
gives exactly the unsharded attention.

`UnifiedBatchWrapper`: a mixed batch, split into its prefill and decode parts
and reassembled in request order.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dcpd.attention.merge import merge_nonempty_partials
from dcpd.attention.ops import attend, resolve_backend
from dcpd.attention.planner import build_plan, check_batch_limits, check_unique_ids, validate_metadata
from dcpd.batch import BatchMetadata, BatchPhase, BatchRequest, DCPPlanConfig, ExecutionPlan, PlanError
from dcpd.kv.cache import PagedKVCache

# A request whose KV is split into more runs than this has its short runs
# (fewer than LONG_RUN_BLOCKS blocks) gathered into a workspace for one call.
MAX_RUNS_BEFORE_GATHER = 4
LONG_RUN_BLOCKS = 16

AttentionOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def validate_qkv(
    cache: PagedKVCache,
    num_q_heads: int,
    num_tokens: int,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Check run() inputs before anything is written to the cache."""
    if not 0 <= layer < cache.num_layers:
        raise PlanError(f"layer {layer} out of range (cache has {cache.num_layers} layers)")
    expected = {
        "q": (num_tokens, num_q_heads, cache.head_dim),
        "k": (num_tokens, cache.num_kv_heads, cache.head_dim),
        "v": (num_tokens, cache.num_kv_heads, cache.head_dim),
    }
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tuple(tensor.shape) != expected[name]:
            raise PlanError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]} (tokens, heads, dim)")
        if tensor.dtype != cache.dtype:
            raise PlanError(f"{name} dtype {tensor.dtype} does not match the KV cache dtype {cache.dtype}")
        if tensor.device != cache.device:
            raise PlanError(f"{name} is on {tensor.device}, the KV cache on {cache.device}")


class BatchExecutor(ABC):
    """Plans a batch once per step and runs attention for one layer per call."""

    phase: BatchPhase

    def __init__(
        self,
        config: DCPPlanConfig,
        kv_cache: PagedKVCache,
        num_q_heads: int,
        *,
        sm_scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        if config.block_size != kv_cache.block_size:
            raise ValueError(
                f"DCPPlanConfig.block_size={config.block_size} does not match the KV cache's {kv_cache.block_size}"
            )
        if num_q_heads < 1 or num_q_heads % kv_cache.num_kv_heads != 0:
            raise ValueError(
                f"num_q_heads={num_q_heads} must be a positive multiple of num_kv_heads={kv_cache.num_kv_heads}"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.num_q_heads = num_q_heads
        self.sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(kv_cache.head_dim)
        self.backend = resolve_backend(backend, kv_cache.device)
        self._workspace: torch.Tensor | None = None
        self._stats = {"plans": 0, "runs": 0, "requests": 0, "tokens": 0, "gathered_requests": 0}

    # -- planning ---------------------------------------------------------------------------
    def plan(self, requests: Sequence[BatchRequest], metadata: BatchMetadata | None = None) -> ExecutionPlan:
        plan = build_plan(
            requests,
            metadata,
            self.config,
            num_blocks=self.kv_cache.num_blocks,
            device=self.kv_cache.device,
            phase=self.phase,
        )
        self._check_plan(requests, plan)
        self._stats["plans"] += 1
        self._stats["requests"] += plan.num_requests
        self._stats["tokens"] += plan.num_tokens
        return plan

    def _check_plan(self, requests: Sequence[BatchRequest], plan: ExecutionPlan) -> None:  # noqa: B027
        """Wrapper-specific restrictions on a batch (none by default)."""

    # -- running ----------------------------------------------------------------------------
    def run(
        self,
        plan: ExecutionPlan,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        return_lse: bool = False,
    ) -> AttentionOutput:
        """Write this step's K/V ([T, Hkv, D]) into layer `layer` of the cache and attend.

        q is [T, Hq, D] with T = plan.num_tokens, tokens in request order. Returns
        out [T, Hq, D] (q's dtype), and with `return_lse` also lse [T, Hq] (float32).
        """
        self._validate_run(plan, layer, q, k, v)
        self._write_kv(plan, layer, k, v)
        slots = self.kv_cache.layer_slots(layer)
        outs, lses = [], []
        for i in range(plan.num_requests):
            query, partials = self._request_partials(plan, i, layer, slots, q, k, v)
            out, lse = _merged(partials, query)
            outs.append(out)
            lses.append(lse)
        self._stats["runs"] += 1
        out, lse = _assemble(outs, lses)
        return (out, lse) if return_lse else out

    @abstractmethod
    def _request_partials(
        self,
        plan: ExecutionPlan,
        i: int,
        layer: int,
        slots: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, list]:
        """Request i's query as [Hq, Lq, D] and its partial (out, lse) results over this rank's keys."""

    def get_stats(self) -> dict[str, Any]:
        return {"wrapper": type(self).__name__, "backend": self.backend, **self._stats}

    def _validate_run(self, plan: ExecutionPlan, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cfg = self.config
        if (plan.block_size, plan.dcp_size, plan.dcp_rank, plan.interleave_size) != (
            cfg.block_size, cfg.dcp_size, cfg.dcp_rank, cfg.interleave_size,
        ):  # fmt: skip
            raise PlanError("plan was built for a different block size or DCP layout")
        validate_qkv(self.kv_cache, self.num_q_heads, plan.num_tokens, layer, q, k, v)

    def _write_kv(self, plan: ExecutionPlan, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = self.kv_cache.layer_slots(layer)  # [2, Hkv, S, D]
        if not plan.writes_all_tokens:
            k = k.index_select(0, plan.write_token_idx)
            v = v.index_select(0, plan.write_token_idx)
        slots[0].index_copy_(1, plan.write_slots, k.transpose(0, 1))
        slots[1].index_copy_(1, plan.write_slots, v.transpose(0, 1))

    def _attend_runs(
        self, layer: int, slots: torch.Tensor, q: torch.Tensor, runs: tuple[tuple[int, int], ...], partials: list
    ) -> None:
        """Append the partial attention of q [Hq, Lq, D] over the cached runs of one request.

        `slots` is the layer's [2, Hkv, num_slots, D] view. Up to MAX_RUNS_BEFORE_GATHER
        runs: one kernel call per run on a zero-copy view. More: runs of at least
        LONG_RUN_BLOCKS blocks stay views; the short ones are copied together into a
        workspace and attended in one call. Any grouping is exact (partials merge by LSE).
        """
        bs = self.kv_cache.block_size
        if len(runs) > MAX_RUNS_BEFORE_GATHER:
            short = tuple(run for run in runs if run[1] < LONG_RUN_BLOCKS * bs)
            if len(short) > 1:
                runs = tuple(run for run in runs if run[1] >= LONG_RUN_BLOCKS * bs)
                k, v = self._gather_runs(layer, short)
                partials.append(attend(q, k, v, causal=False, scale=self.sm_scale, backend=self.backend))
                self._stats["gathered_requests"] += 1
        for first_block, num_tokens in runs:
            start = first_block * bs
            end = start + num_tokens
            partials.append(
                attend(q, slots[0, :, start:end], slots[1, :, start:end], causal=False, scale=self.sm_scale,
                       backend=self.backend)
            )  # fmt: skip

    def _gather_runs(self, layer: int, runs: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy runs into a reused contiguous workspace: k, v as [Hkv, L, D] views.

        Every run but the last of a request is whole blocks, so the tokens are the
        runs' blocks in order, truncated to the runs' total token count.
        """
        cache = self.kv_cache
        bs = cache.block_size
        blocks = [b for first, tokens in runs for b in range(first, first + -(-tokens // bs))]
        num_tokens = sum(tokens for _, tokens in runs)
        shape = (2, cache.num_kv_heads, len(blocks), bs, cache.head_dim)
        need = math.prod(shape)
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=cache.dtype, device=cache.device)
        out = self._workspace[:need].view(shape)
        index = torch.tensor(blocks, dtype=torch.long).to(cache.device, non_blocking=True)
        torch.index_select(cache.layer(layer), 2, index, out=out)
        flat = out.view(2, cache.num_kv_heads, len(blocks) * bs, cache.head_dim)
        return flat[0, :, :num_tokens], flat[1, :, :num_tokens]


def _merged(partials: list, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's result from its partials: (out [Hq, Lq, D], lse [Hq, Lq])."""
    if not partials:  # no keys on this rank for this request
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), device=q.device)
    return merge_nonempty_partials(partials)


def _assemble(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-request [Hq, Lq, D] / [Hq, Lq] results -> token-major out [T, Hq, D], lse [T, Hq] (one copy each)."""
    out = torch.cat(outs, dim=1).transpose(0, 1).contiguous()
    lse = torch.cat(lses, dim=1).transpose(0, 1).float().contiguous()
    return out, lse


class BatchDCPPrefillWrapper(BatchExecutor):
    """Chunked prefill over a batch: causal self-attention + cached context, merged by LSE."""

    phase = BatchPhase.PREFILL

    def _request_partials(
        self,
        plan: ExecutionPlan,
        i: int,
        layer: int,
        slots: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, list]:
        rows = slice(plan.query_start_loc_host[i], plan.query_start_loc_host[i + 1])
        query = q[rows].transpose(0, 1)  # [Hq, Lq, D]
        partials: list = []
        if plan.computes_new_block[i]:
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
            partials.append(attend(query, keys, values, causal=True, scale=self.sm_scale, backend=self.backend))
        self._attend_runs(layer, slots, query, plan.runs[i].context, partials)
        return query, partials


class BatchDCPDecodeWrapper(BatchExecutor):
    """Decode over a batch: exactly one new token per request against its paged sequence."""

    phase = BatchPhase.DECODE

    def _check_plan(self, requests: Sequence[BatchRequest], plan: ExecutionPlan) -> None:
        for req in requests:
            if req.query_len != 1:
                raise PlanError(
                    f"BatchDCPDecodeWrapper: request {req.request_id!r} has {req.query_len} new tokens; "
                    "decode takes exactly 1 (use the prefill or unified wrapper)"
                )

    def _request_partials(
        self,
        plan: ExecutionPlan,
        i: int,
        layer: int,
        slots: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, list]:
        query = q[i].unsqueeze(1)  # [Hq, 1, D]
        partials: list = []
        self._attend_runs(layer, slots, query, plan.runs[i].sequence, partials)
        return query, partials


@dataclass(frozen=True)
class MixedPlan:
    """A unified batch's plan: one ExecutionPlan per part, with the token rows each part owns.

    `token_index` is None when a part is the whole batch (no split, no copies).
    """

    phase: BatchPhase
    num_tokens: int
    parts: tuple[tuple[ExecutionPlan, torch.Tensor | None], ...]
    metadata: BatchMetadata

    @property
    def positions(self) -> torch.Tensor:
        """Global position of every token, in batch order (for RoPE)."""
        if len(self.parts) == 1:
            return self.parts[0][0].positions
        positions = torch.empty(self.num_tokens, dtype=torch.long, device=self.parts[0][0].positions.device)
        for sub_plan, index in self.parts:
            positions.index_copy_(0, index, sub_plan.positions)
        return positions


class UnifiedBatchWrapper:
    """A mixed batch: prefill requests go to a prefill wrapper, decode requests to a decode wrapper.

    `plan()` returns a `MixedPlan`; `run()` splits q/k/v by part, runs both and
    reassembles outputs in the batch's request order.
    """

    def __init__(
        self,
        config: DCPPlanConfig,
        kv_cache: PagedKVCache,
        num_q_heads: int,
        *,
        sm_scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        self.prefill = BatchDCPPrefillWrapper(config, kv_cache, num_q_heads, sm_scale=sm_scale, backend=backend)
        self.decode = BatchDCPDecodeWrapper(config, kv_cache, num_q_heads, sm_scale=sm_scale, backend=backend)
        self.config = config
        self.kv_cache = kv_cache
        self._stats = {"plans": 0, "runs": 0, "requests": 0, "tokens": 0, "mixed_plans": 0}

    def plan(self, requests: Sequence[BatchRequest], metadata: BatchMetadata | None = None) -> MixedPlan:
        if metadata is None:
            metadata = BatchMetadata.from_requests(requests)
        else:
            validate_metadata(requests, metadata)
        check_batch_limits(len(requests), metadata.num_tokens, self.config)
        check_unique_ids(requests)
        decode_idx = [i for i, r in enumerate(requests) if r.phase is BatchPhase.DECODE and r.query_len == 1]
        decode_set = set(decode_idx)
        prefill_idx = [i for i in range(len(requests)) if i not in decode_set]
        starts = metadata.query_start_loc
        parts: list[tuple[ExecutionPlan, torch.Tensor | None]] = []
        for wrapper, idx in ((self.prefill, prefill_idx), (self.decode, decode_idx)):
            if not idx:
                continue
            sub = [requests[i] for i in idx]
            sub_plan = wrapper.plan(sub, None if len(idx) < len(requests) else metadata)
            if len(idx) == len(requests):
                token_index = None  # the whole batch: no split, no copies
            else:
                token_index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx]).to(self.kv_cache.device)
            parts.append((sub_plan, token_index))
        self._stats["plans"] += 1
        self._stats["requests"] += len(requests)
        self._stats["tokens"] += metadata.num_tokens
        self._stats["mixed_plans"] += int(len(parts) == 2)
        return MixedPlan(phase=metadata.phase, num_tokens=metadata.num_tokens, parts=tuple(parts), metadata=metadata)

    def run(
        self,
        plan: MixedPlan,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        return_lse: bool = False,
    ) -> AttentionOutput:
        validate_qkv(self.kv_cache, self.prefill.num_q_heads, plan.num_tokens, layer, q, k, v)
        if len(plan.parts) == 1 and plan.parts[0][1] is None:
            sub_plan, _ = plan.parts[0]
            wrapper = self.prefill if sub_plan.phase is BatchPhase.PREFILL else self.decode
            result = wrapper.run(sub_plan, layer, q, k, v, return_lse=True)
            self._stats["runs"] += 1
            return result if return_lse else result[0]
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
        for sub_plan, index in plan.parts:
            wrapper = self.prefill if sub_plan.phase is BatchPhase.PREFILL else self.decode
            sub_out, sub_lse = wrapper.run(
                sub_plan,
                layer,
                q.index_select(0, index),
                k.index_select(0, index),
                v.index_select(0, index),
                return_lse=True,
            )
            out.index_copy_(0, index, sub_out)
            lse.index_copy_(0, index, sub_lse)
        self._stats["runs"] += 1
        return (out, lse) if return_lse else out

    def get_stats(self) -> dict[str, Any]:
        return {
            "wrapper": type(self).__name__,
            **self._stats,
            "prefill": self.prefill.get_stats(),
            "decode": self.decode.get_stats(),
        }
