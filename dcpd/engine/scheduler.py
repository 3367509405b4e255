"""Continuous batching: choose each step's requests and token counts under the budgets.

One step's decision is a `SchedulerOutput`, the only thing the model runner sees.
Order of business each step:
  1. running requests, oldest first: a decode token each, or the next prefill chunk;
     a request that cannot get the KV blocks it needs preempts the newest running
     request (its blocks are freed; it is recomputed later) until it fits;
  2. waiting requests, first come first served, while budget and blocks (beyond
     the reserve, unless no block is in use) remain: their first prefill chunk.
A long prompt is split into chunks that share steps with decodes (MIXED batches).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from dcpd.engine.block_manager import BlockManager
from dcpd.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens [num_computed, num_computed + num_new_tokens) computed this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == len(self.request.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_batch_size: int, max_tokens_per_batch: int) -> None:
        self.blocks = block_manager
        self.max_batch_size = max_batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request, *, release: bool = True) -> None:
        """Take a request out of the queues and (unless told to keep them) free its blocks."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if release:
            self.blocks.release(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.blocks.release(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        victim.status = RequestStatus.WAITING
        self.waiting.appendleft(victim)
        out.preempted.append(victim)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_tokens_per_batch
        preempted_now = False
        i = 0
        while i < len(self.running) and budget > 0 and len(out.scheduled) < self.max_batch_size:
            req = self.running[i]
            n = min(req.num_pending_tokens, budget)
            target = req.num_computed_tokens + n
            while not self.blocks.can_grow(req, target, use_reserve=True):
                # Newest first, but never a hold_kv request: its blocks are being streamed to a decode
                # peer (it holds its whole prompt already, so `req` is never one and is a candidate).
                victim = next(r for r in reversed(self.running) if not r.hold_kv)
                self._preempt(victim, out)
                preempted_now = True
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break  # req itself was the newest and got preempted
            self.blocks.grow(req, target, use_reserve=True)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            i += 1
        # Admit new work only when nothing had to be preempted this step.
        while self.waiting and not preempted_now and budget > 0 and len(out.scheduled) < self.max_batch_size:
            req = self.waiting[0]
            n = min(req.num_pending_tokens, budget)
            target = req.num_computed_tokens + n
            # A hold_kv (prefill-only) request takes its whole prompt now, the reserve included: it never
            # grows later, so it never has to preempt anyone, nor be preempted, while its KV streams out.
            # With no block in use, the reserve protects no one (no running request, nor KV reserved to
            # become one): a first chunk bigger than the blocks beyond it (a prompt, or a preempted
            # request's recompute, near the whole cache) may use it.
            idle = not self.running and self.blocks.pool.num_used == 0
            need, reserve = (req.num_prompt_tokens, True) if req.hold_kv else (target, idle)
            if not self.blocks.can_grow(req, need, use_reserve=reserve):
                break
            self.blocks.grow(req, need, use_reserve=reserve)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out
