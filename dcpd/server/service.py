"""What every daemon role shares: signals -> drain, sd_notify, the watchdog, metrics, and crash = exit 1.

A role subclasses `Service`, binds its sockets in `open()`, returns its loop
coroutines from `tasks()`, and calls `self.stopped.set()` once drained. The
watchdog ping is sent from the event loop, so a stalled loop trips it. A role
with an engine reports how long its current step has run (`step_running_s`):
past `engine.step_timeout_s` the step is stuck, and since a Python thread
cannot be stopped, the process fails its requests and exits 1 at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

import structlog
import zmq
import zmq.asyncio

from dcpd.config import Config
from dcpd.server.metrics import Metrics
from dcpd.server.sdnotify import Notifier, watchdog_interval_s

log = structlog.get_logger("dcpd.service")


def exit_now(code: int) -> None:
    """Exit the process at once. A normal exit would join the step thread, which may never return."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Service:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.draining = False
        self.stopped = asyncio.Event()
        self.exit_code = 0
        self.zmq_context = zmq.asyncio.Context()
        self.metrics_port: int | None = None
        self._optional_tasks: set[str] = set()  # coroutine names allowed to end on their own

    # -- what a role provides -----------------------------------------------------------------------
    def open(self) -> None:
        """Bind and connect sockets; a zmq.ZMQError here exits 1 with a log line."""

    def close(self) -> None:
        """Close sockets (the context is terminated afterwards)."""

    def tasks(self) -> list[Coroutine[Any, Any, None]]:
        return []

    def describe(self) -> dict[str, Any]:
        return {}

    def on_drain(self) -> None:
        """Drain began: stop taking new work; set `stopped` once in-flight work is done."""

    def on_drain_deadline(self) -> None:
        """The drain budget ran out: abort what is left."""

    def step_running_s(self) -> float:
        """How long the engine step in flight has run (0.0: none, or no engine)."""
        return 0.0

    def on_step_stuck(self) -> None:
        """The step is stuck and the process is about to exit: tell whoever waits on it."""

    # -- lifecycle ----------------------------------------------------------------------------------
    def _fail_to_start(self, what: str, exc: Exception, extra: list[Coroutine[Any, Any, None]] | None) -> int:
        """One error line, every socket closed, exit status 1."""
        log.error(what, error=str(exc), **self.describe())
        self.close()
        self.zmq_context.term()
        self.shutdown()
        for coro in extra or []:
            coro.close()
        return 1

    async def serve(self, extra: list[Coroutine[Any, Any, None]] | None = None) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain, sig.name)
        try:
            self.open()
        except zmq.ZMQError as exc:
            return self._fail_to_start("cannot bind or connect a socket", exc, extra)
        if self.config.metrics.enabled:
            metrics = self.config.metrics
            try:
                self.metrics_port = self.metrics.serve(metrics.host, metrics.port)
            except OSError as exc:  # the port in use, an unknown host
                return self._fail_to_start(f"cannot serve metrics on {metrics.host}:{metrics.port}", exc, extra)
        tasks = [asyncio.create_task(coro) for coro in self.tasks()]
        interval = watchdog_interval_s()
        if interval:
            tasks.append(asyncio.create_task(self._watchdog(interval)))
        if self.config.engine.step_timeout_s > 0:
            tasks.append(asyncio.create_task(self._step_watch(self.config.engine.step_timeout_s)))
        for coro in extra or []:
            self._optional_tasks.add(coro.__name__)
            tasks.append(asyncio.create_task(coro))
        for task in tasks:
            task.add_done_callback(self._task_done)
        role = self.config.server.role
        log.info("serving", role=role, metrics_port=self.metrics_port, **self.describe())
        self.notifier.notify("READY=1", f"STATUS={role} serving")
        await self.stopped.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.close()
        self.zmq_context.term()
        self.shutdown()
        log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    def shutdown(self) -> None:
        """After the loop tasks ended: release threads and the like."""

    def _task_done(self, task: asyncio.Task) -> None:
        """A loop task must never end on its own: if one crashes, exit non-zero (systemd restarts us)."""
        if task.cancelled() or self.stopped.is_set():
            return
        name = task.get_coro().__name__
        if name in self._optional_tasks and task.exception() is None:
            return
        log.error("internal task died", task=name, error=repr(task.exception()))
        self.exit_code = 1
        self.stopped.set()

    def crashed(self, what: str = "a helper thread") -> None:
        """A thread of ours died of a bug: exit non-zero (systemd restarts us) rather than limp on."""
        log.error("internal thread died; exiting", thread=what)
        self.exit_code = 1
        self.stopped.set()

    def begin_drain(self, reason: str = "signal") -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining", reason=reason, budget_s=self.config.server.drain_timeout_s)
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        asyncio.get_running_loop().call_later(self.config.server.drain_timeout_s, self.on_drain_deadline)
        self.on_drain()

    async def _step_watch(self, timeout: float) -> None:
        """Exit 1 when a step outlives `timeout`: the loop (which feeds the watchdog and sends heartbeats)
        would otherwise keep a daemon whose engine is gone looking healthy, and the drain would wait on
        the step for ever."""
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            running = self.step_running_s()
            if running <= timeout:
                continue
            log.error("engine step stuck; exiting", running_s=round(running, 2), step_timeout_s=timeout)
            self.notifier.notify("STATUS=engine step stuck; exiting")
            self.on_step_stuck()
            # Blocking on purpose: nothing on the loop may run (or cancel this) from here on, while
            # ZeroMQ's I/O thread sends the replies on_step_stuck queued.
            time.sleep(0.5)
            exit_now(1)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")  # sent from the loop: a stalled loop trips the watchdog
            await asyncio.sleep(interval)
