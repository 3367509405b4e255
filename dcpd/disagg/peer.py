"""What prefill and decode peers share: the control channel to the router, and the engine loop.

The control channel is a DEALER (routing id = the peer's name) connected to the
router. Until the router accepts it the peer sends `Register` every heartbeat
interval; afterwards `Heartbeat`s carrying its load. If the router goes silent
for `peer_timeout_s` (or forgets us), the peer drops every request it holds --
the router has failed them anyway -- frees their blocks, and registers again.

The engine is stepped in its own thread (EngineService). Everything else that
touches the engine (new requests, cancels, adopting KV, releasing blocks) is
queued as an operation and applied by the loop between steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
import zmq

from dcpd.config import EX_CONFIG, Config
from dcpd.disagg import messages as m
from dcpd.disagg.layout import PeerLayout
from dcpd.engine import RequestOutput
from dcpd.model.loader import LoadedModel
from dcpd.server.daemon import EngineService
from dcpd.server.service import Service

log = structlog.get_logger("dcpd.peer")

# After a step that could schedule nothing, the longest the engine loop waits for an operation that
# frees blocks before trying again (they wake it at once; this only bounds a wake-up gone missing).
NOTHING_SCHEDULED_RECHECK_S = 0.1
UNANSWERED_WARNING_S = 10.0  # how often a peer the router does not answer says so


def peer_name(config: Config) -> str:
    return config.disagg.peer_name or f"{config.server.role}-{socket.gethostname()}-{os.getpid()}"


class PeerService(Service):
    role: str

    def __init__(self, config: Config, loaded: LoadedModel) -> None:
        super().__init__(config)
        self.loaded = loaded
        self.worker = EngineService(config, loaded)
        self.engine = self.worker.engine
        self.name = peer_name(config)
        self.layout = PeerLayout.describe(loaded.config, self.engine.kv_cache)
        self.control: zmq.asyncio.Socket | None = None
        self.registered = False
        self.epoch = 0
        self.boot = secrets.token_hex(8)
        self.last_heard = time.monotonic()
        self.last_warned = self.last_heard
        self.ops: list[Callable[[], None]] = []  # applied between steps, in order
        self.work = asyncio.Event()

    # -- what a role provides -----------------------------------------------------------------------
    def kv_endpoint(self) -> str | None:
        return None

    def handle(self, message: m.RouterMessage) -> None:
        raise NotImplementedError

    def make_step(self) -> Callable[[], list[RequestOutput]]:
        """On the loop, before a step: the function the step thread runs."""
        return self.engine.step

    def after_step(self, outputs: list[RequestOutput]) -> None:
        """Back on the loop, after a step."""

    def housekeeping(self) -> None:
        """Every heartbeat interval, on the loop: timeouts and leases."""

    def drop_everything(self, why: str, *, report: bool) -> None:
        """Free every request's blocks. `report`: tell the router each one failed (it is still there:
        a failed step, the drain deadline); otherwise the router is gone or forgot us."""
        raise NotImplementedError

    def idle(self) -> bool:
        raise NotImplementedError

    # -- lifecycle ----------------------------------------------------------------------------------
    def open(self) -> None:
        sock = m.control_socket(self.zmq_context, zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.name.encode())
        self.control = sock
        sock.connect(self.config.disagg.router_endpoint)

    def close(self) -> None:
        if self.control is not None:
            self.control.close(linger=1000)  # the last Output / PrefillDone of a drain: let it leave

    def shutdown(self) -> None:
        self.worker.close(self.exit_code)

    def step_running_s(self) -> float:
        return self.worker.running_s()

    def on_step_stuck(self) -> None:
        # Loop-side only (engine changes are queued between steps, and none will come): the router
        # hears now, not a peer_timeout_s later, and retries what it can elsewhere.
        self.drop_everything("the engine step is stuck; the peer is exiting", report=True)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "router": self.config.disagg.router_endpoint, "kv_endpoint": self.kv_endpoint(),
                "model": self.loaded.source, "kv_blocks": self.engine.kv_cache.num_blocks}  # fmt: skip

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return [self._control_loop(), self._heartbeat_loop(), self._engine_loop()]

    def on_drain(self) -> None:
        self._send(m.Heartbeat(load=self.load()))  # tell the router at once: no new work for us
        self.work.set()

    def on_drain_deadline(self) -> None:
        if not self.idle():
            log.warning("drain budget exceeded; dropping what is left")
            self.drop_everything("drain budget exceeded", report=True)
            self.work.set()

    def _from_thread(self, fn: Callable[..., None]) -> Callable[..., None]:
        """A callback for one of our threads: it runs `fn` on the event loop (call in open())."""
        loop = asyncio.get_running_loop()
        return lambda *args: loop.call_soon_threadsafe(fn, *args)

    # -- control channel ----------------------------------------------------------------------------
    def _send(self, message: m._Control) -> None:
        """Send without blocking. A failed send is logged; the router then times the request out."""
        if self.control is None:
            return
        future = self.control.send(m.encode(message), flags=zmq.NOBLOCK)
        future.add_done_callback(m.log_send_failure("control message"))

    def load(self) -> m.PeerLoad:
        pool = self.engine.kv_cache.pool
        return m.PeerLoad(
            waiting=len(self.engine.scheduler.waiting), running=len(self.engine.scheduler.running),
            kv_blocks_free=pool.num_free, kv_blocks_total=pool.num_blocks, kv_blocks_reserve=pool.reserve_blocks,
            draining=self.draining,
        )  # fmt: skip

    async def _heartbeat_loop(self) -> None:
        d = self.config.disagg
        while True:
            if self.registered and time.monotonic() - self.last_heard > d.peer_timeout_s:
                log.warning("router silent; dropping every request and registering again",
                            silent_s=round(time.monotonic() - self.last_heard, 2))  # fmt: skip
                self._lost_router("router silent")
            if self.registered:
                self._send(m.Heartbeat(load=self.load()))
            else:
                self._warn_if_unanswered(time.monotonic())
                self._send(m.Register(name=self.name, role=self.role, layout=self.layout,  # type: ignore[arg-type]
                                      kv_endpoint=self.kv_endpoint(), load=self.load(), pid=os.getpid(),
                                      epoch=self.epoch, boot=self.boot))  # fmt: skip
            self.housekeeping()
            self.worker.update_gauges(self.metrics)
            await asyncio.sleep(d.heartbeat_interval_s)

    def _warn_if_unanswered(self, now: float) -> None:
        """While registering: a warning every UNANSWERED_WARNING_S without a word from the router."""
        silent = now - self.last_heard
        if silent >= UNANSWERED_WARNING_S and now - self.last_warned >= UNANSWERED_WARNING_S:
            self.last_warned = now
            log.warning("no answer from the router yet; still registering",
                        router=self.config.disagg.router_endpoint, silent_s=round(silent, 1))  # fmt: skip

    def _lost_router(self, why: str) -> None:
        self.registered = False
        self.epoch += 1  # the router must treat our next registration as a fresh start
        self.drop_everything(why, report=False)
        self.notifier.notify(f"STATUS={self.role} peer: {why}; registering again")
        self.work.set()

    async def _control_loop(self) -> None:
        while True:
            frame = await self.control.recv()
            self.last_heard = time.monotonic()
            try:
                message = m.decode_router(frame)
            except m.ControlError as exc:
                log.error("bad message from the router", error=str(exc))
                if (version := m.foreign_version(frame, "registered")) is not None:
                    self._on_registered(m.Registered(ok=False, fatal=True, error=(
                        f"the router speaks control protocol version {version}; this peer speaks {m.CONTROL_VERSION}"
                    )))  # fmt: skip
                continue
            if isinstance(message, m.Registered):
                self._on_registered(message)
            elif isinstance(message, m.HeartbeatAck):
                pass
            elif not self.registered:
                log.warning("router message before registration; ignored", type=type(message).__name__)
            else:
                try:
                    self.handle(message)
                except Exception:  # one bad message must not stop the peer
                    log.exception("failed to handle a router message", type=type(message).__name__)

    def _on_registered(self, message: m.Registered) -> None:
        if message.ok:
            if not self.registered:
                log.info("registered with the router", router=self.config.disagg.router_endpoint)
                self.notifier.notify(f"STATUS={self.role} peer registered with {self.config.disagg.router_endpoint}")
            self.registered = True
            return
        if message.fatal:
            log.error("the router refused us", error=message.error)
            self.exit_code = EX_CONFIG
            self.stopped.set()
        elif self.registered:  # the router restarted or dropped us: what we hold is orphaned
            log.warning("the router no longer knows us", error=message.error)
            self._lost_router(message.error or "unknown to the router")

    def wrong_role(self, message: m.RouterMessage) -> None:
        """A router message for the other role: refused (a request in it fails now, not at a timeout)."""
        why = f"{type(message).__name__} sent to a {self.role} peer"
        log.warning("router message for another role; refused", type=type(message).__name__)
        if isinstance(message, m.Reserve):
            self._send(m.Reserved(key=message.key, ok=False, code="invalid_request", error=why))
        elif isinstance(message, m.Prefill):
            self._send(m.PrefillDone(key=message.key, ok=False, error=why))

    # -- the engine loop ---------------------------------------------------------------------------
    def between_steps(self, op: Callable[[], None]) -> None:
        self.ops.append(op)
        self.work.set()

    def _apply_ops(self) -> None:
        ops, self.ops = self.ops, []
        for op in ops:
            try:
                op()
            except Exception:
                log.exception("operation between steps failed")

    async def _engine_loop(self) -> None:
        while True:
            self._apply_ops()
            if self.draining and self.idle():
                self.stopped.set()
                return
            if not self.engine.has_unfinished():
                await self._wait_for_work()
                continue
            steps = self.engine.num_steps
            try:
                outputs = await self.worker.run_in_step_thread(self.make_step())
            except Exception:
                log.exception("engine step failed")
                self.drop_everything("engine step failed", report=True)
                continue
            self.after_step(outputs)
            if self.engine.num_steps > steps:
                self.metrics.steps.inc()
            elif not self.engine.last_preempted:
                # Nothing could be scheduled: the blocks it needs are reserved for incoming KV or held
                # for a transfer. What frees them comes as an operation between steps; until one
                # does, stepping again would only spin.
                await self._wait_for_work(NOTHING_SCHEDULED_RECHECK_S)

    async def _wait_for_work(self, timeout: float | None = None) -> None:
        """Until an operation is queued between steps (`between_steps` sets `work`), or `timeout`."""
        self.work.clear()
        if not self.ops:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.work.wait(), timeout)
