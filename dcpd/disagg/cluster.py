"""`dcpd cluster`: a router plus N prefill and M decode daemons on this host, as child processes.

Each child is an ordinary `dcpd serve --role ...` process (so `ps` shows each
role), connected over ipc:// sockets in a private runtime directory (or tcp
loopback ports with `--kv-transport tcp`). The cluster is ready once every
peer has registered with the router; it then prints one JSON line (frontend,
child pids) and notifies systemd (the children's own notifications are not
passed up: the cluster is the unit's main process, and it feeds the watchdog).
SIGTERM/SIGINT drain it: the router first (it finishes in-flight requests,
which needs the peers), then the peers. If the router dies the cluster stops.
A peer that dies is started again (the router retries its requests on the
others meanwhile, and takes the new process for a restart): at once the first
time, then after a delay that doubles with each death in the window (0.5, 1,
2, 4 s), so a peer that cannot start does not spin; unless it exited with a
configuration error (the cluster stops with 78) or died more than
RESTART_BURST times within RESTART_WINDOW_S (the cluster stops with 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dcpd.client import Client, DcpdError
from dcpd.config import EPHEMERAL_PORTS, EX_CONFIG, ConfigError, connectable, load_config
from dcpd.server.main import model_problem
from dcpd.server.sdnotify import Notifier, watchdog_interval_s

RESTART_BURST = 5  # a peer restarted this often ...
RESTART_WINDOW_S = 60.0  # ... within this long is given up on
RESTART_BACKOFF_S = 0.5  # the delay before the second restart in the window; doubles after each
# What systemd gives the unit's main process, kept from the children: it is the cluster's to answer.
SYSTEMD_ONLY_FOR_US = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML config for every child (roles and endpoints are set by the cluster)")
    parser.add_argument("--model", help="model directory (default: the embedded demo model)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill daemons (default 1)")
    parser.add_argument("--decode", type=int, default=1, help="decode daemons (default 1)")
    parser.add_argument("--frontend", help="the router's client endpoint (default: server.frontend)")
    parser.add_argument("--kv-transport", choices=["ipc", "tcp"], default="ipc", help="how KV moves between peers")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for every peer")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a key in every child",
    )  # fmt: skip


@dataclass
class Child:
    role: str
    name: str
    proc: subprocess.Popen
    extra: tuple[str, ...]  # its own `--set` items (to start it again the same way)
    restarts: list[float] = field(default_factory=list)  # when it died and was to be started again
    restart_at: float | None = None  # dead, to be started again at this time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For the child, before exec: get SIGTERM if the cluster process dies (Linux), so no daemon is orphaned."""

    def arm() -> None:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def _log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "logger": "dcpd.cluster", **fields}), file=sys.stderr, flush=True)


class Cluster:
    def __init__(self, args: argparse.Namespace, frontend: str, drain_timeout_s: float) -> None:
        self.args = args
        self.frontend = frontend
        self.drain_timeout_s = drain_timeout_s  # each child's (server.drain_timeout_s)
        self.runtime = tempfile.mkdtemp(prefix="dcpd-", dir="/tmp")  # ipc paths must stay short
        self.router_endpoint = f"ipc://{self.runtime}/router"
        self.children: list[Child] = []
        self.stopping = False
        self.force = False  # a second signal: kill the children now
        self.notifier = Notifier()
        self.watchdog_s = watchdog_interval_s()
        self.last_watchdog = 0.0

    def _spawn(self, role: str, name: str, *extra: str) -> Child:
        child = Child(role, name, self._popen(role, name, extra), extra)
        self.children.append(child)
        return child

    def _popen(self, role: str, name: str, extra: tuple[str, ...]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "dcpd.cli", "serve", "--role", role]
        if self.args.config:
            cmd += ["--config", self.args.config]
        if self.args.model:
            cmd += ["--model", self.args.model]
        sets = [*self.args.overrides, "metrics.port=0", f"disagg.router_endpoint={json.dumps(self.router_endpoint)}",
                f"disagg.peer_name={json.dumps(name)}", *extra]  # fmt: skip
        for item in sets:
            cmd += ["--set", item]
        env = {key: value for key, value in os.environ.items() if key not in SYSTEMD_ONLY_FOR_US}
        # children log to our stderr (their JSON lines carry role and name); our stdout has the ready line
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True, env=env,
                                preexec_fn=_die_with_parent(os.getpid()))  # fmt: skip

    def feed_watchdog(self) -> None:
        now = time.monotonic()
        if self.watchdog_s and now - self.last_watchdog >= self.watchdog_s:
            self.notifier.notify("WATCHDOG=1")
            self.last_watchdog = now

    def start(self) -> None:
        self._spawn("router", "router", f"server.frontend={json.dumps(self.frontend)}")
        for i in range(self.args.prefill):
            self._spawn("prefill", f"prefill-{i}")
        for i in range(self.args.decode):
            if self.args.kv_transport == "tcp":
                kv = f"tcp://127.0.0.1:{_free_port()}"
            else:
                kv = f"ipc://{self.runtime}/kv-{i}"
            self._spawn("decode", f"decode-{i}", f"disagg.kv_endpoint={json.dumps(kv)}")

    def wait_ready(self, timeout: float) -> int | None:
        """None once every peer has registered; else the exit status (after stopping everything)."""
        deadline = time.monotonic() + timeout
        with Client(connectable(self.frontend), timeout=2.0) as client:
            while time.monotonic() < deadline and not self.stopping:
                self.feed_watchdog()
                for child in self.children:
                    if child.proc.poll() is not None:
                        code = child.proc.returncode
                        _log("child exited before the cluster was ready; stopping", role=child.role,
                             name=child.name, exit_code=code)  # fmt: skip
                        self.stop()
                        return EX_CONFIG if code == EX_CONFIG else 1
                try:
                    stats = client.stats()
                except DcpdError:
                    time.sleep(0.2)
                    continue
                if stats.get("prefill_peers") == self.args.prefill and stats.get("decode_peers") == self.args.decode:
                    return None
                time.sleep(0.2)
        if self.stopping:  # a signal: a clean stop
            return self.stop()
        _log("cluster not ready in time; stopping", timeout_s=timeout)
        self.stop()
        return 1

    def describe(self) -> dict[str, object]:
        pids: dict[str, list[int]] = {}
        for child in self.children:
            pids.setdefault(child.role, []).append(child.proc.pid)
        return {"frontend": self.frontend, "router_endpoint": self.router_endpoint, "pids": pids}

    def supervise(self) -> int:
        """Until a signal: watch the children, start dead peers again. Returns the exit status."""
        router = self.children[0]
        while not self.stopping:
            self.feed_watchdog()
            if router.proc.poll() is not None:
                _log("router exited; stopping the cluster", exit_code=router.proc.returncode)
                self.stop()
                return 1
            for child in self.children[1:]:
                if child.restart_at is not None:
                    if time.monotonic() >= child.restart_at:
                        self._start_again(child)
                elif child.proc.poll() is not None and (status := self._peer_died(child)) is not None:
                    self.stop()
                    return status
            time.sleep(0.2)
        return self.stop()

    def _peer_died(self, child: Child) -> int | None:
        """Schedule a dead peer's restart; or, when that cannot help, return the cluster's exit status."""
        code = child.proc.returncode
        if code == EX_CONFIG:
            _log("peer exited with a configuration error; stopping the cluster", role=child.role, name=child.name)
            return EX_CONFIG
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S]
        if len(child.restarts) >= RESTART_BURST:
            _log("peer keeps dying; stopping the cluster", role=child.role, name=child.name, exit_code=code,
                 restarts=len(child.restarts), window_s=RESTART_WINDOW_S)  # fmt: skip
            return 1
        recent = len(child.restarts)
        delay = RESTART_BACKOFF_S * 2 ** (recent - 1) if recent else 0.0
        child.restarts.append(now)
        child.restart_at = now + delay
        _log("peer exited; starting it again", role=child.role, name=child.name, exit_code=code, delay_s=delay)
        return None

    def _start_again(self, child: Child) -> None:
        child.restart_at = None
        child.proc = self._popen(child.role, child.name, child.extra)
        _log("peer started again", role=child.role, name=child.name, pid=child.proc.pid,
             waited_s=round(time.monotonic() - child.restarts[-1], 3))  # fmt: skip

    def stop(self) -> int:
        """Drain: the router first, then the peers. One budget for all (two drains + margin); whatever
        outlives it, or everything after a second signal, gets SIGKILL."""
        self.notifier.notify("STOPPING=1")
        deadline = time.monotonic() + 2 * self.drain_timeout_s + 20
        status = 0
        groups = [self.children[:1], self.children[1:]]
        for group in groups:
            for child in group:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            for child in group:
                while child.proc.poll() is None and time.monotonic() < deadline and not self.force:
                    time.sleep(0.05)
                if child.proc.poll() is None:
                    _log("child did not drain in time; killed", role=child.role, name=child.name)
                    child.proc.kill()
                code = child.proc.wait()
                if code not in (0, -signal.SIGTERM):  # (SIGTERM before its handler was set: still starting)
                    status = status or (code if code > 0 else 1)
        shutil.rmtree(self.runtime, ignore_errors=True)
        _log("cluster stopped", exit_code=status)
        return status


def run(args: argparse.Namespace) -> int:
    if args.prefill < 1 or args.decode < 1:
        print("dcpd cluster: --prefill and --decode must be >= 1", file=sys.stderr)
        return 2
    if args.ready_timeout <= 0:
        print("dcpd cluster: --ready-timeout must be > 0", file=sys.stderr)
        return 2
    frontend = [f"server.frontend={json.dumps(args.frontend)}"] if args.frontend else []
    try:
        config = load_config(args.config, [*args.overrides, *frontend])
    except ConfigError as exc:
        print(f"dcpd cluster: bad config: {exc}", file=sys.stderr)
        return EX_CONFIG
    if (model := args.model or config.model.path) and (problem := model_problem(model)):  # one line, not one per child
        print(f"dcpd cluster: bad config: model: {problem}", file=sys.stderr)
        return EX_CONFIG
    if connectable(config.server.frontend).rpartition(":")[2] in EPHEMERAL_PORTS:
        print("dcpd cluster: --frontend needs a fixed port: clients must know where to connect", file=sys.stderr)
        return 2
    cluster = Cluster(args, config.server.frontend, config.server.drain_timeout_s)

    def on_signal(signum: int, _frame: object) -> None:
        cluster.force = cluster.stopping  # a second signal while draining: kill now
        cluster.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start()
    if (status := cluster.wait_ready(args.ready_timeout)) is not None:
        return status
    print(json.dumps({"event": "cluster ready", **cluster.describe()}), flush=True)
    cluster.notifier.notify("READY=1", f"STATUS=cluster serving on {cluster.frontend}")
    return cluster.supervise()
