"""The offline engine: `step()` = schedule -> run (plan once, model, sample) -> postprocess.

No sockets: `dcpd run` and the tests drive it directly; the daemon wraps it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from dcpd.batch import DCPPlanConfig
from dcpd.engine.block_manager import BlockManager
from dcpd.engine.model_runner import ModelRunner
from dcpd.engine.request import (
    FinishReason,
    Request,
    RequestError,
    RequestStatus,
    SamplingParams,
    check_prompt,
)
from dcpd.engine.scheduler import Scheduler, SchedulerOutput
from dcpd.kv.cache import PagedKVCache
from dcpd.model.loader import LoadedModel


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for a request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    error: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    num_preemptions: int
    ttft_s: float | None


class LLMEngine:
    def __init__(self, loaded: LoadedModel, plan_config: DCPPlanConfig | None = None, *, seed: int = 0) -> None:
        self.loaded = loaded
        config = loaded.config
        self.plan_config = plan_config or DCPPlanConfig()
        if self.plan_config.dcp_size != 1:
            raise ValueError("LLMEngine runs one DCP rank; dcp_size > 1 needs the distributed runner")
        device = next(loaded.model.parameters()).device
        dtype = next(loaded.model.parameters()).dtype
        self.kv_cache = PagedKVCache.from_config(
            self.plan_config,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            dtype=dtype,
            device=device,
        )
        self.block_manager = BlockManager(self.kv_cache.pool, self.plan_config.block_size)
        self.scheduler = Scheduler(
            self.block_manager,
            max_batch_size=self.plan_config.max_batch_size,
            max_tokens_per_batch=self.plan_config.max_tokens_per_batch,
        )
        self.runner = ModelRunner(loaded.model, self.kv_cache, self.plan_config, seed=seed)
        self.requests: dict[str, Request] = {}
        self.max_model_len = config.max_position_embeddings
        self._ids = itertools.count()
        self.num_steps = 0
        self.last_preempted: list[str] = []  # request ids preempted by the latest step
        self.held_kv: dict[str, list[int]] = {}  # prefill side: finished requests' blocks awaiting transfer
        self.held_since: dict[str, float] = {}  # when each held_kv entry started (for lease expiry)
        self.reserved: dict[str, list[int]] = {}  # decode side: blocks reserved for KV on its way

    # -- requests -------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        request_id: str | None = None,
        *,
        hold_kv: bool = False,
    ) -> str:
        """Queue a request; raises RequestError (and queues nothing) for invalid input.

        `hold_kv` (a prefill peer): a prefill-only request (`max_tokens` 1). It takes every block
        of its prompt when admitted and is never preempted, since its KV streams out of those
        blocks while it runs; when it finishes (normally, or by a failed step) the blocks stay
        allocated, listed in `held_kv`, until `release_held()` (after the transfer is acknowledged,
        or once nothing reads them any more); `abort_request` frees them at once.
        """
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if hold_kv and params.max_tokens != 1:
            raise RequestError(f"a hold_kv request is prefill-only: max_tokens must be 1, got {params.max_tokens}")
        prompt = self.validate_request(prompt_token_ids, params)
        request = Request(request_id, prompt, params, hold_kv=hold_kv)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def validate_request(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> list[int]:
        """Check a request against the model and cache limits (reads no mutable state: thread-safe)."""
        vocab = self.loaded.config.vocab_size
        prompt = check_prompt(prompt_token_ids, params, vocab_size=vocab, max_model_len=self.max_model_len)
        total = len(prompt) + params.max_tokens
        if not self.block_manager.fits_at_all(total):
            raise RequestError(
                f"prompt + max_tokens = {total} tokens needs {self.block_manager.blocks_for(total)} KV blocks; "
                f"the cache has {self.kv_cache.num_blocks}"
            )
        return prompt

    def abort_request(self, request_id: str) -> bool:
        """Abort a queued or running request; its blocks return to the pool. False if unknown or done."""
        request = self.requests.get(request_id)
        if request is None or request.is_finished:
            return False
        self._finish(request, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (a long-running server calls this after replying)."""
        request = self.requests.get(request_id)
        if request is not None and request.is_finished:
            del self.requests[request_id]

    # -- disaggregation: holding KV on the prefill side, reserving and adopting it on the decode side
    def release_held(self, request_id: str) -> None:
        """Free the KV blocks a finished `hold_kv` request kept (transfer acknowledged or lease expired)."""
        blocks = self.held_kv.pop(request_id, None)
        self.held_since.pop(request_id, None)
        if blocks:
            self.kv_cache.pool.free(blocks)

    def held_past(self, lease_s: float, now: float | None = None) -> list[str]:
        """Ids of held KV whose transfer was not acknowledged within the lease."""
        now = time.monotonic() if now is None else now
        return [rid for rid, since in self.held_since.items() if now - since > lease_s]

    def expire_held(self, lease_s: float, now: float | None = None) -> list[str]:
        """Release held KV whose transfer was not acknowledged within the lease; returns their ids."""
        expired = self.held_past(lease_s, now)
        for rid in expired:
            self.release_held(rid)
        return expired

    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int]:
        """Reserve blocks for `num_tokens` tokens of KV arriving from a prefill peer.

        Raises KVCacheExhausted (nothing reserved) when they are not available beyond the reserve:
        a full decode peer refuses up front. Raises RequestError when they never could be.
        """
        if request_id in self.reserved or request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        pool, needed = self.kv_cache.pool, self.block_manager.blocks_for(num_tokens)
        reservable = pool.num_blocks - pool.reserve_blocks
        if needed > reservable:  # would be refused as kv_full for ever
            raise RequestError(
                f"a prompt of {num_tokens} tokens needs {needed} KV blocks reserved; this decode peer reserves "
                f"at most {reservable} of its {pool.num_blocks} (the other {pool.reserve_blocks} are kept for "
                "running requests to grow into)"
            )
        blocks = pool.allocate(needed)
        self.reserved[request_id] = blocks
        return blocks

    def cancel_reservation(self, request_id: str) -> None:
        blocks = self.reserved.pop(request_id, None)
        if blocks:
            self.kv_cache.pool.free(blocks)

    def add_prefilled_request(
        self, request_id: str, prompt_token_ids: Sequence[int], first_token: int, params: SamplingParams
    ) -> list[RequestOutput]:
        """Adopt a request whose prompt KV arrived into its reserved blocks; it continues with decode.

        Returns the output for the first token when that already finishes the request.
        """
        if request_id not in self.reserved:
            raise RequestError(f"request {request_id!r} has no reserved blocks")
        try:
            prompt = self.validate_request(prompt_token_ids, params)
            vocab = self.loaded.config.vocab_size
            if not isinstance(first_token, int) or not 0 <= first_token < vocab:
                raise RequestError(f"first token {first_token!r} is outside the vocabulary [0, {vocab})")
        except RequestError:
            self.cancel_reservation(request_id)
            raise
        blocks = self.reserved.pop(request_id)
        if len(blocks) < self.block_manager.blocks_for(len(prompt)):
            self.kv_cache.pool.free(blocks)
            raise RequestError(
                f"request {request_id!r}: {len(blocks)} reserved blocks cannot hold {len(prompt)} tokens"
            )
        request = Request(request_id, prompt, params, block_ids=blocks, num_computed_tokens=len(prompt))
        request.token_ids.append(first_token)
        if request.generator is not None:  # the prefill peer drew the first token's number from this seed:
            torch.rand(1, generator=request.generator)  # continue the sequence where it left off
        request.first_token_time = time.monotonic()
        request.status = RequestStatus.RUNNING
        self.requests[request_id] = request
        self.scheduler.running.append(request)
        reason = self._stop_reason(request, first_token)
        if reason is None:
            return []
        self._finish(request, reason)
        return [RequestOutput(request_id, [], True, reason)]

    def _finish(self, request: Request, reason: FinishReason, error: str | None = None) -> None:
        # A hold_kv request's KV may be streaming out of its blocks: they stay held, even when its step
        # failed, until the owner releases them (`release_held`). An abort is that owner's own call.
        keep = request.hold_kv and reason != FinishReason.ABORT
        self.scheduler.remove(request, release=not keep)
        if keep:
            self.held_kv[request.request_id] = request.block_ids
            self.held_since[request.request_id] = time.monotonic()
            request.block_ids = []
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.error = error
        request.finish_time = time.monotonic()

    # -- the step -------------------------------------------------------------------------------
    def step(self, on_layer: Callable[[SchedulerOutput, int], None] | None = None) -> list[RequestOutput]:
        """One step. `on_layer(scheduled, layer)` runs, in this thread, once each layer's K/V is written."""
        scheduled = self.scheduler.schedule()
        self.last_preempted = [r.request_id for r in scheduled.preempted]
        if scheduled.is_empty:
            return []
        self.num_steps += 1
        try:
            hook = None if on_layer is None else (lambda layer: on_layer(scheduled, layer))
            sampled = self.runner.execute(scheduled, hook)
        except Exception as exc:  # a failed step fails its requests, never the engine
            outputs = []
            for s in scheduled.scheduled:
                self._finish(s.request, FinishReason.ERROR, f"{type(exc).__name__}: {exc}")
                outputs.append(RequestOutput(s.request.request_id, [], True, FinishReason.ERROR, s.request.error))
            return outputs
        return self._postprocess(scheduled, sampled)

    def _postprocess(self, scheduled: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        outputs = []
        now = time.monotonic()
        for s in scheduled.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            token = sampled.get(req.request_id)
            if token is None:  # a prefill chunk that did not reach the end
                continue
            req.token_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            reason = self._stop_reason(req, token)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(RequestOutput(req.request_id, [token], reason is not None, reason))
        return outputs

    def _stop_reason(self, req: Request, token: int) -> FinishReason | None:
        if token in req.params.stop_token_ids:
            return FinishReason.STOP
        if not req.params.ignore_eos and token in self.loaded.stop_token_ids:
            return FinishReason.STOP
        if len(req.output_token_ids) >= req.params.max_tokens or len(req.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    # -- offline convenience ----------------------------------------------------------------------
    def generate(
        self, prompts: Iterable[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[GenerationResult]:
        """Run every prompt concurrently to completion; results in input order."""
        prompts = [list(p) for p in prompts]
        all_params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        while self.has_unfinished():
            self.step()
        return [self.result(rid) for rid in ids]

    def result(self, request_id: str) -> GenerationResult:
        req = self.requests[request_id]
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
        return GenerationResult(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=list(req.output_token_ids),
            text=self.loaded.tokenizer.decode(req.output_token_ids),
            finish_reason=req.finish_reason.value if req.finish_reason else "running",
            num_preemptions=req.num_preemptions,
            ttft_s=ttft,
        )

    def stats(self) -> dict[str, object]:
        pool = self.kv_cache.pool.stats()
        return {
            "steps": self.num_steps,
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_free": pool.num_free,
            "attention": self.runner.attention.get_stats(),
        }
