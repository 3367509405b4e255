"""The decode peer: reserves blocks before a prefill starts, receives the KV into them, and decodes.

Conditional disaggregation: a `Reserve` with `prefill_here` queues the whole
request in this engine (prefill included), with no KV transfer.

A `Reserve` from the router allocates the prompt's blocks up front (a full peer
answers `kv_full` at once rather than failing mid-transfer), and tells the KV
thread to expect them. When the last chunk arrives with the first token, the
request joins the running batch (`add_prefilled_request`) and its tokens
stream to the router as `Output`s. Reserved blocks whose KV does not arrive
within `kv_timeout_s` are freed and the router is told.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
import zmq

from dcpd.config import Config
from dcpd.disagg import messages as m
from dcpd.disagg.ingest import KVIngest, bind_kv_socket
from dcpd.disagg.peer import PeerService
from dcpd.disagg.transfer import KVAck, keep_frame_memory
from dcpd.engine import RequestError, RequestOutput, SamplingParams
from dcpd.kv.block_pool import KVCacheExhausted
from dcpd.model.loader import LoadedModel
from dcpd.server.frontend import sampling_params

log = structlog.get_logger("dcpd.decode")


@dataclass
class AwaitingKV:
    key: str
    prompt: list[int]
    params: SamplingParams
    since: float = field(default_factory=time.monotonic)
    cancelled: bool = False


class DecodePeer(PeerService):
    role = "decode"

    def __init__(self, config: Config, loaded: LoadedModel) -> None:
        super().__init__(config, loaded)
        self.awaiting: dict[str, AwaitingKV] = {}  # blocks reserved, KV on its way
        self.active: set[str] = set()  # adopted: decoding in the engine
        self.kv_context = zmq.Context()
        self.ingest: KVIngest | None = None
        self.generation = 0  # +1 on drop_everything: reservations queued before it are void
        self.queued_reserves: set[str] = set()  # Reserve received, not yet applied between steps
        self.cancelled_early: set[str] = set()  # of those, cancelled already: they must not run

    def kv_endpoint(self) -> str | None:
        return self.config.disagg.kv_endpoint

    def open(self) -> None:
        super().open()
        log.debug("allocator set to keep received frames' memory", applied=keep_frame_memory())
        sock = bind_kv_socket(self.kv_context, self.engine.kv_cache, self.config.disagg.kv_endpoint)
        self.ingest = KVIngest(
            self.engine.kv_cache, sock, on_done=self._from_thread(self._on_kv),
            on_cancelled=self._from_thread(self._on_kv_cancelled), on_crash=self._from_thread(self.crashed),
        )  # fmt: skip
        self.ingest.start()

    def close(self) -> None:
        super().close()
        if self.ingest is not None:
            self.ingest.stop()
        self.kv_context.term()

    def idle(self) -> bool:
        return not self.awaiting and not self.active and not self.engine.has_unfinished() and not self.engine.reserved

    # -- router messages ---------------------------------------------------------------------------
    def handle(self, message: m.RouterMessage) -> None:
        if isinstance(message, m.Reserve):
            if self.draining:
                self._send(m.Reserved(key=message.key, ok=False, code="draining", error="the decode peer is draining"))
            else:
                generation = self.generation
                self.queued_reserves.add(message.key)
                self.between_steps(lambda: self._reserve(message, generation))
        elif isinstance(message, m.Cancel):
            self._cancel(message.key, report=None)
        else:
            self.wrong_role(message)

    def _cancel(self, key: str, report: str | None) -> None:
        """End a request here; `report`: the error to tell the router (None: the router asked)."""
        waiting = self.awaiting.get(key)
        if waiting is not None:
            if not waiting.cancelled:
                waiting.cancelled = True
                self.ingest.cancel(key)  # its blocks are freed once the KV thread confirms (_on_kv_cancelled)
                if report is not None:  # now: the loop may not run again (a stuck step exits the process)
                    self._send(m.Output(key=key, token_ids=[], finished=True, reason="error", error=report))
        elif key in self.active:
            self.active.discard(key)
            self.between_steps(lambda: (self.engine.abort_request(key), self.engine.forget(key)))
        elif key in self.queued_reserves:  # its Reserve is still queued: it must not run
            self.cancelled_early.add(key)

    def _reserve(self, message: m.Reserve, generation: int) -> None:
        """Between steps: reserve the prompt's blocks and expect its KV, or refuse."""
        key = message.key
        self.queued_reserves.discard(key)
        if key in self.cancelled_early or generation != self.generation:
            self.cancelled_early.discard(key)
            return
        params = sampling_params(message.sampling)
        if message.prefill_here:
            try:
                self.engine.add_request(message.prompt_ids, params, request_id=key)
            except RequestError as exc:
                self._send(m.Reserved(key=key, ok=False, code="invalid_request", error=str(exc)))
                return
            self.active.add(key)
            log.info("prefilling here", key=key, prompt_tokens=len(message.prompt_ids))
            self._send(m.Reserved(key=key, ok=True))
            return
        try:
            prompt = self.engine.validate_request(message.prompt_ids, params)
            blocks = self.engine.reserve_blocks(key, len(prompt))
        except RequestError as exc:
            self._send(m.Reserved(key=key, ok=False, code="invalid_request", error=str(exc)))
            return
        except KVCacheExhausted as exc:
            self._send(m.Reserved(key=key, ok=False, code="kv_full", error=str(exc)))
            return
        self.awaiting[key] = AwaitingKV(key, prompt, params)
        self.ingest.expect(key, blocks)
        log.info("reserved", key=key, blocks=len(blocks), prompt_tokens=len(prompt))
        self._send(m.Reserved(key=key, ok=True))

    # -- KV thread results (on the loop) -----------------------------------------------------------
    def _on_kv(self, key: str, ack: KVAck) -> None:
        waiting = self.awaiting.get(key)
        if waiting is None or waiting.cancelled:  # the cancel path frees the blocks
            return
        if ack.ok and ack.first_token is not None:
            self.between_steps(lambda: self._adopt(key, ack.first_token))
            return
        del self.awaiting[key]
        self.between_steps(lambda: self.engine.cancel_reservation(key))
        error = f"KV transfer failed: {ack.error or 'the last chunk carried no first token'}"
        log.warning("KV refused", key=key, error=error)
        self._send(m.Output(key=key, token_ids=[], finished=True, reason="error", error=error))

    def _on_kv_cancelled(self, key: str) -> None:
        """The KV thread will write no more into this request's blocks: free them."""
        self.awaiting.pop(key, None)
        self.between_steps(lambda: self.engine.cancel_reservation(key))

    def _adopt(self, key: str, first_token: int) -> None:
        """Between steps: the KV is in; the request joins the running batch with its first token."""
        waiting = self.awaiting.get(key)
        if waiting is None or waiting.cancelled:
            return
        del self.awaiting[key]
        try:
            outputs = self.engine.add_prefilled_request(key, waiting.prompt, first_token, waiting.params)
        except RequestError as exc:  # the reservation is freed by add_prefilled_request
            self._send(m.Output(key=key, token_ids=[], finished=True, reason="error", error=str(exc)))
            return
        log.info("decoding", key=key, waited_ms=round((time.monotonic() - waiting.since) * 1e3, 2))
        finished = bool(outputs)
        reason = outputs[0].finish_reason.value if finished and outputs[0].finish_reason else None
        self._send(m.Output(key=key, token_ids=[first_token], finished=finished, reason=reason))
        if finished:
            self.engine.forget(key)
        else:
            self.active.add(key)

    # -- decoding ----------------------------------------------------------------------------------
    def after_step(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            key = output.request_id
            if key not in self.active:
                continue
            reason = output.finish_reason.value if output.finish_reason else None
            self._send(m.Output(key=key, token_ids=output.new_token_ids, finished=output.finished, reason=reason,
                                error=output.error))  # fmt: skip
            if output.finished:
                self.active.discard(key)
                self.engine.forget(key)
        if self.engine.last_preempted:
            self.metrics.preemptions.inc(len(self.engine.last_preempted))

    def housekeeping(self) -> None:
        timeout = self.config.disagg.kv_timeout_s
        now = time.monotonic()
        for waiting in list(self.awaiting.values()):
            if not waiting.cancelled and now - waiting.since > timeout:
                log.warning("no KV arrived in time; reservation freed", key=waiting.key, kv_timeout_s=timeout)
                self._cancel(waiting.key, report=f"no KV arrived within {timeout} s")

    def drop_everything(self, why: str, *, report: bool) -> None:
        if self.awaiting or self.active:
            log.warning("dropping decode requests", awaiting=len(self.awaiting), active=len(self.active), why=why)
        self.generation += 1  # voids the reservations still queued between steps
        if report:  # the router is there and waits for an answer to each: a refusal sends them elsewhere
            for key in self.queued_reserves - self.cancelled_early:
                self._send(m.Reserved(key=key, ok=False, code="kv_full", error=f"the decode peer dropped it: {why}"))
        for key in list(self.awaiting):
            self._cancel(key, report=why if report else None)
        for key in list(self.active):
            self._cancel(key, report=None)
            if report:
                self._send(m.Output(key=key, token_ids=[], finished=True, reason="error", error=why))
