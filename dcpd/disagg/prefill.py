"""The prefill peer: computes prompts in chunked, continuous batches and pushes their KV to decode peers.

KV streams layer by layer: during each step, as soon as the model has written a
layer's K/V, that layer of the blocks the step makes final goes to the transfer
thread, so the push overlaps the rest of the forward pass (and the next
chunk's). When the prompt is done the first token is sampled, and the last
chunk (the final step's last layer, carrying the first token) goes out.
The request's blocks stay allocated (`hold_kv`) until the decode peer
acknowledges, or until `kv_lease_s` passes with no acknowledgment; however a
transfer ends, they are freed only once the pusher says ZeroMQ no longer reads
them (`on_done`, `on_released`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from dcpd.config import Config
from dcpd.disagg import messages as m
from dcpd.disagg.peer import PeerService
from dcpd.disagg.pusher import FORGOTTEN_KEYS, Chunk, KVPusher
from dcpd.disagg.transfer import KVAck
from dcpd.engine import FinishReason, RequestError, RequestOutput, SamplingParams
from dcpd.engine.scheduler import SchedulerOutput
from dcpd.model.loader import LoadedModel
from dcpd.server.frontend import sampling_params

log = structlog.get_logger("dcpd.prefill")


@dataclass
class PrefillJob:
    key: str
    prompt: list[int]
    endpoint: str  # the decode peer's KV endpoint
    num_blocks: int  # blocks the prompt's KV fills
    started: float = dataclasses.field(default_factory=time.monotonic)
    # advanced by the step thread only:
    sent_blocks: int = 0
    seq: int = 0
    final_sent: bool = False


def prefill_params(params: SamplingParams) -> SamplingParams:
    """Sample exactly the first token; the decode peer decides whether it stops the request."""
    return dataclasses.replace(params, max_tokens=1, stop_token_ids=(), ignore_eos=True)


class PrefillPeer(PeerService):
    role = "prefill"

    def __init__(self, config: Config, loaded: LoadedModel) -> None:
        super().__init__(config, loaded)
        self.jobs: dict[str, PrefillJob] = {}
        self.used_keys: OrderedDict[str, None] = OrderedDict()  # the last FORGOTTEN_KEYS accepted
        self.pusher: KVPusher | None = None
        self._step_jobs: dict[str, PrefillJob] = {}
        self.releasing: set[str] = set()  # forgotten (cancelled, failed, lease expired, dropped): their
        # blocks are freed once the pusher lets go of them (`_on_released`, `_on_pushed`), never before
        self.doomed: deque[set[str]] = deque()  # per drop_everything: what to free once the pusher let go

    def open(self) -> None:
        super().open()
        self.pusher = KVPusher(
            self.engine.kv_cache,
            on_first_chunk=self._from_thread(self._on_first_chunk),
            on_done=self._from_thread(self._on_pushed),
            on_released=self._from_thread(self._on_released),
            on_crash=self._from_thread(self.crashed),
            send_timeout_s=self.config.disagg.peer_timeout_s,
            nice=self.config.disagg.push_nice,
        )
        self.pusher.start()

    def shutdown(self) -> None:
        super().shutdown()
        if self.pusher is not None:
            self.pusher.stop()

    def idle(self) -> bool:
        return not self.jobs and not self.engine.held_kv and not self.engine.has_unfinished()

    # -- router messages ---------------------------------------------------------------------------
    def handle(self, message: m.RouterMessage) -> None:
        if isinstance(message, m.Prefill):
            self._accept(message)
        elif isinstance(message, m.Cancel):
            if self.jobs.pop(message.key, None) is not None:
                log.info("cancelled", key=message.key)
                self._forget(message.key)
        elif isinstance(message, m.DropPeer):
            log.info("decode peer gone; closing its KV connection", kv_endpoint=message.kv_endpoint)
            self.pusher.drop_peer(message.kv_endpoint)
        else:
            self.wrong_role(message)

    def _accept(self, message: m.Prefill) -> None:
        key = message.key
        if key in self.jobs:
            log.warning("duplicate prefill request ignored", key=key)
            return
        if key in self.used_keys:  # the pusher would drop its chunks as those of the cancelled attempt
            log.warning("prefill request with a used key refused", key=key)
            self._send(m.PrefillDone(key=key, ok=False, error=f"key {key!r} was already used on this prefill peer: "
                                                              "every attempt needs a new key"))  # fmt: skip
            return
        if self.draining:
            self._send(m.PrefillDone(key=key, ok=False, error="the prefill peer is draining"))
            return
        self.used_keys[key] = None
        if len(self.used_keys) > FORGOTTEN_KEYS:
            self.used_keys.popitem(last=False)
        blocks = self.engine.block_manager.blocks_for(len(message.prompt_ids))
        job = PrefillJob(key, list(message.prompt_ids), message.kv_endpoint, blocks)
        self.jobs[key] = job
        params = prefill_params(sampling_params(message.sampling))
        log.info("prefilling", key=key, prompt_tokens=len(job.prompt), decode_peer=message.decode_peer)

        def add() -> None:
            if key not in self.jobs:  # cancelled before it started
                return
            try:
                self.engine.add_request(job.prompt, params, request_id=key, hold_kv=True)
            except RequestError as exc:
                self._fail(key, f"invalid request: {exc}")

        self.between_steps(add)

    def _fail(self, key: str, error: str, *, decode_side: bool = False) -> None:
        if self.jobs.pop(key, None) is None:
            return
        self.metrics.transfer_failures.inc()
        log.warning("prefill failed", key=key, error=error)
        self._forget(key)
        self._send(m.PrefillDone(key=key, ok=False, error=error, decode_side=decode_side))

    def _forget(self, key: str) -> None:
        self.releasing.add(key)
        self.pusher.forget(key)  # its blocks are freed on `_on_released`

    def _drop_request(self, key: str) -> None:
        """Between steps: whatever the engine holds for `key` goes back to the pool."""
        self.engine.abort_request(key)
        self.engine.release_held(key)
        self.engine.forget(key)
        self.releasing.discard(key)

    def _on_released(self, key: str | None) -> None:
        """The pusher will read no more of these blocks: a forgotten request's, or (None) everything
        the oldest unfinished drop_everything doomed."""
        if key is not None:
            self.between_steps(lambda: self._drop_request(key))
            return
        doomed = self.doomed.popleft()
        self.between_steps(lambda: [self._drop_request(k) for k in doomed])

    # -- stepping and pushing ------------------------------------------------------------------------
    def make_step(self) -> Callable[[], list[RequestOutput]]:
        self._step_jobs = {job.key: job for job in self.jobs.values()}  # a snapshot: the loop may change `jobs`
        return self._step_and_push

    def _step_and_push(self) -> list[RequestOutput]:
        """In the step thread: one engine step, streaming KV layer by layer as the model writes it.

        For each prefill job in the step, the blocks that this step makes final (every token in
        them computed; all of the prompt's blocks when the step completes the prompt) are pushed
        one layer at a time, as soon as that layer's attention has written them, so the transfer
        overlaps the rest of the forward pass. The final step's last layer waits for the sampled
        first token and goes out after the step, as the request's last chunk.
        """
        plan: list[tuple[PrefillJob, list[int], int, bool]] = []  # job, blocks, first block index, final
        num_layers = self.engine.kv_cache.num_layers

        def on_layer(scheduled: SchedulerOutput, layer: int) -> None:
            if layer == 0:
                plan.extend(self._blocks_to_stream(scheduled))
            for job, blocks, offset, final in plan:
                if not (final and layer == num_layers - 1):
                    self._push(job, blocks, offset, (layer, layer + 1), last=False)

        outputs = self.engine.step(on_layer)
        for job, blocks, offset, final in plan:
            job.sent_blocks = offset + len(blocks)
            request = self.engine.requests.get(job.key)
            if not final or request is None or request.finish_reason not in (FinishReason.LENGTH, FinishReason.STOP):
                continue  # a chunk of the prompt; or the request failed (after_step reports it)
            layers = (num_layers - 1, num_layers)
            self._push(job, blocks, offset, layers, last=True, first_token=request.token_ids[-1])
            job.final_sent = True
        return outputs

    def _blocks_to_stream(self, scheduled: SchedulerOutput) -> list[tuple[PrefillJob, list[int], int, bool]]:
        block_size = self.engine.plan_config.block_size
        plan = []
        for s in scheduled.scheduled:
            job = self._step_jobs.get(s.request.request_id)
            if job is None or job.final_sent:
                continue
            request = s.request  # hold_kv: its blocks are fixed from admission on, never preempted
            done = request.num_computed_tokens + s.num_new_tokens
            final = done >= request.num_prompt_tokens
            end = job.num_blocks if final else min(done // block_size, job.num_blocks)
            start = min(job.sent_blocks, end - 1) if final else job.sent_blocks  # the last chunk has >= 1 block
            if end > start:
                plan.append((job, request.block_ids[start:end], start, final))
        return plan

    def _push(
        self, job: PrefillJob, blocks: list[int], offset: int, layers: tuple[int, int], *, last: bool,
        first_token: int | None = None,
    ) -> None:  # fmt: skip
        self.pusher.push(Chunk(job.key, job.endpoint, job.seq, list(blocks), offset, layers, last, first_token))
        job.seq += 1

    def after_step(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished and output.finish_reason not in (FinishReason.LENGTH, FinishReason.STOP):
                self._fail(output.request_id, output.error or f"prefill ended: {output.finish_reason}")
        if self.engine.last_preempted:
            self.metrics.preemptions.inc(len(self.engine.last_preempted))

    # -- transfer results (on the loop) ------------------------------------------------------------
    def _on_first_chunk(self, key: str) -> None:
        if key in self.jobs:
            self._send(m.Transferring(key=key))

    def _on_pushed(self, key: str, ack: KVAck, nbytes: int, seconds: float) -> None:
        job = self.jobs.pop(key, None)
        self.between_steps(lambda: self._drop_request(key))  # acknowledged or failed, and released: our copy goes
        if job is None:
            return
        self.metrics.transfer_bytes.inc(nbytes)
        if ack.ok:
            self.metrics.transfer_seconds.observe(seconds)
            gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
            self.metrics.transfer_throughput.observe(gbps)
            log.info("transferred", key=key, bytes=nbytes, chunks=ack.chunks, transfer_ms=round(seconds * 1e3, 2),
                     gb_per_s=round(gbps, 3), prefill_ms=round((time.monotonic() - job.started) * 1e3, 2))  # fmt: skip
        else:
            self.metrics.transfer_failures.inc()
            log.warning("transfer failed", key=key, error=ack.error)
        self._send(m.PrefillDone(key=key, ok=ack.ok, bytes=nbytes, transfer_s=seconds, error=ack.error,
                                 decode_side=not ack.ok))  # refused, unreachable or gone: see KVPusher  # fmt: skip

    def housekeeping(self) -> None:
        lease = self.config.disagg.kv_lease_s

        def expire() -> None:
            for key in self.engine.held_past(lease):
                if key in self.releasing:  # already on its way back to the pool
                    continue
                log.warning("KV lease expired with no acknowledgment; blocks freed", key=key, lease_s=lease)
                if key in self.jobs:  # freed once the pusher lets go of its queued chunks
                    self._fail(key, f"no KV acknowledgment within the {lease} s lease", decode_side=True)
                else:  # the pusher never had it, or let go of it
                    self._drop_request(key)

        if self.engine.held_kv:
            self.between_steps(expire)

    def drop_everything(self, why: str, *, report: bool) -> None:
        if self.jobs:
            log.warning("dropping prefill requests", requests=len(self.jobs), why=why)
        # Everything held now goes, once the pusher has closed its connections (discarding what they
        # still had queued); what arrives after this call is not touched.
        doomed = set(self.jobs) | set(self.engine.requests) | set(self.engine.held_kv)
        self.doomed.append(doomed)
        self.releasing |= doomed
        for key in list(self.jobs):
            if report:
                self._fail(key, why)
            else:
                self._forget(key)
        self.jobs.clear()
        self.pusher.drop_all()
