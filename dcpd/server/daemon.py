"""The unified daemon: the client frontend plus an asyncio scheduler loop around one engine.

Threads: the asyncio loop (uvloop) owns the socket, the client bookkeeping and
every engine call except `step()`, which runs in a dedicated single-thread
executor (in a copy of the loop's context, so log context follows). Requests
and aborts that arrive during a step are queued and applied between steps, so
the engine is never touched by two threads at once. The loop keeps serving the
socket while the model computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from dcpd.batch import DCPPlanConfig
from dcpd.config import Config, EngineSection
from dcpd.engine import LLMEngine, RequestError, SamplingParams
from dcpd.model.loader import LoadedModel
from dcpd.server.frontend import ClientRequest, Frontend
from dcpd.server.metrics import Metrics
from dcpd.server.service import exit_now

log = structlog.get_logger("dcpd.daemon")
T = TypeVar("T")


def plan_config(eng: EngineSection) -> DCPPlanConfig:
    return DCPPlanConfig(
        max_batch_size=eng.max_batch_size,
        max_tokens_per_batch=eng.max_tokens_per_batch,
        block_size=eng.block_size,
        kv_cache_bytes=eng.kv_cache_mb << 20,
        kv_reserve_fraction=eng.kv_reserve_fraction,
    )


class EngineService:
    """An engine stepped in its own thread: `run_in_step_thread()` awaits a call (a step) there without
    blocking the loop; `running_s()` says how long it has run, for the step watch."""

    def __init__(self, config: Config, loaded: LoadedModel) -> None:
        self.engine = LLMEngine(loaded, plan_config(config.engine), seed=config.engine.seed)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcpd-step")
        self.step_timeout_s = config.engine.step_timeout_s
        self.in_flight: concurrent.futures.Future | None = None  # the last call, until it has returned
        self.started = 0.0

    async def run_in_step_thread(self, fn: Callable[..., T], *args: object) -> T:
        """One call at a time (the role's engine loop awaits each before the next)."""
        context = contextvars.copy_context()
        self.started = time.monotonic()
        self.in_flight = self.executor.submit(context.run, fn, *args)
        return await asyncio.wrap_future(self.in_flight)

    def running_s(self) -> float:
        """How long the call in the step thread has run; 0.0 when there is none (even if the loop
        stopped awaiting it: the thread may still be running it)."""
        call = self.in_flight
        return 0.0 if call is None or call.done() else time.monotonic() - self.started

    def update_gauges(self, metrics: Metrics, queued: int = 0) -> None:
        """The engine's queue, batch and KV pool gauges (`queued`: requests not handed to it yet)."""
        pool = self.engine.kv_cache.pool
        metrics.queue_depth.set(len(self.engine.scheduler.waiting) + queued)
        metrics.running.set(len(self.engine.scheduler.running))
        metrics.kv_used.set(pool.num_used)
        metrics.kv_free.set(pool.num_free)

    def close(self, exit_code: int) -> None:
        """Stop the step thread. A call still running is waited for up to what is left of
        `engine.step_timeout_s` (for ever when that is 0); past that it is stuck, and since a normal
        exit would join its thread, the process exits at once."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        call = self.in_flight
        if call is None or call.done():
            return
        timeout = max(0.0, self.step_timeout_s - self.running_s()) if self.step_timeout_s > 0 else None
        if not concurrent.futures.wait([call], timeout=timeout).done:
            log.error("engine step still running at exit; not waiting for it", step_timeout_s=self.step_timeout_s)
            exit_now(exit_code or 1)


class Daemon(Frontend):
    def __init__(self, config: Config, loaded: LoadedModel) -> None:
        super().__init__(config, loaded.tokenizer, loaded.source)
        self.worker = EngineService(config, loaded)
        self.engine = self.worker.engine
        self.pending_adds: list[ClientRequest] = []
        self.pending_aborts: list[tuple[str, str | None]] = []  # (key, error code or None)
        self.work = asyncio.Event()

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self.receive_loop(), self._engine_loop()]

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "kv_blocks": self.engine.kv_cache.num_blocks}

    def shutdown(self) -> None:
        self.worker.close(self.exit_code)

    def step_running_s(self) -> float:
        return self.worker.running_s()

    # -- Frontend hooks: requests and aborts wait for the next gap between steps --------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> list[int]:
        return self.engine.validate_request(prompt, params)

    def submit(self, request: ClientRequest) -> None:
        self.pending_adds.append(request)
        self.work.set()

    def cancel(self, key: str, code: str | None) -> None:
        self.pending_aborts.append((key, code))
        self.work.set()

    def on_drain(self) -> None:
        super().on_drain()
        self.work.set()

    # -- the scheduler loop ------------------------------------------------------------------------
    def _apply_pending(self) -> None:
        """Between steps only: hand queued requests and aborts to the engine."""
        adds, self.pending_adds = self.pending_adds, []
        for request in adds:
            if request.key not in self.inflight:  # aborted meanwhile
                continue
            try:
                self.engine.add_request(request.prompt_ids, request.params, request_id=request.key)
            except RequestError as exc:  # validated on arrival; only a bug gets here, and only this request fails
                self.finish(request, "error", error=str(exc), error_code="internal")
        aborts, self.pending_aborts = self.pending_aborts, []
        for key, code in aborts:
            request = self.inflight.get(key)
            if request is None:
                continue
            self.engine.abort_request(key)
            self.engine.forget(key)
            self.finish(request, "abort", error_code=code)

    async def _engine_loop(self) -> None:
        while True:
            self._apply_pending()
            self.worker.update_gauges(self.metrics, queued=len(self.pending_adds))
            if not self.engine.has_unfinished():
                self.work.clear()
                if not self.pending_adds and not self.pending_aborts:
                    await self.work.wait()
                continue
            try:
                outputs = await self.worker.run_in_step_thread(self.engine.step)
            except Exception:  # the engine fails requests itself; this is a bug in the step machinery
                log.exception("engine step failed")
                for key in list(self.inflight):
                    self.pending_aborts.append((key, "internal"))
                continue
            self.metrics.steps.inc()
            if self.engine.last_preempted:
                self.metrics.preemptions.inc(len(self.engine.last_preempted))
                log.info("preempted", requests=self.engine.last_preempted)
            for output in outputs:
                reason = output.finish_reason.value if output.finish_reason else None
                self.deliver(output.request_id, output.new_token_ids, output.finished, reason, output.error)
                if output.finished:
                    self.engine.forget(output.request_id)

    def stats(self) -> dict[str, int | float | str]:
        pool = self.engine.kv_cache.pool
        return {
            **super().stats(),
            "waiting": len(self.engine.scheduler.waiting) + len(self.pending_adds),
            "running": len(self.engine.scheduler.running),
            "kv_blocks_total": pool.num_blocks,
            "kv_blocks_free": pool.num_free,
            "steps": self.engine.num_steps,
        }
