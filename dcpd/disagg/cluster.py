"""`dcpd cluster`: a router plus N prefill and M decode daemons on this host, as child processes.

Each child is an ordinary `dcpd serve --role ...` process (so `ps` shows each
role), connected over ipc:// sockets in a private runtime directory (or tcp
loopback ports with `--kv-transport tcp`). The cluster is ready once every
peer has registered with the router; it then prints one JSON line (frontend,
child pids) and notifies systemd. SIGTERM/SIGINT drain it: the router first
(it finishes in-flight requests, which needs the peers), then the peers. If
the router dies the cluster stops; a peer that dies is only logged (the router
retries its requests elsewhere).
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
from dataclasses import dataclass

from dcpd.client import Client, DcpdError
from dcpd.config import EX_CONFIG, ConfigError, load_config
from dcpd.server.sdnotify import Notifier


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

    def _spawn(self, role: str, name: str, *extra: str) -> Child:
        cmd = [sys.executable, "-m", "dcpd.cli", "serve", "--role", role]
        if self.args.config:
            cmd += ["--config", self.args.config]
        if self.args.model:
            cmd += ["--model", self.args.model]
        sets = [*self.args.overrides, "metrics.port=0", f"disagg.router_endpoint={json.dumps(self.router_endpoint)}",
                f"disagg.peer_name={json.dumps(name)}", *extra]  # fmt: skip
        for item in sets:
            cmd += ["--set", item]
        # children log to our stderr (their JSON lines carry role and name); our stdout has the ready line
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr, start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))  # fmt: skip
        child = Child(role, name, proc)
        self.children.append(child)
        return child

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

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with Client(self.frontend, timeout=2.0) as client:
            while time.monotonic() < deadline and not self.stopping:
                for child in self.children:
                    if child.proc.poll() is not None:
                        _log("child exited before the cluster was ready", role=child.role, name=child.name,
                             exit_code=child.proc.returncode)  # fmt: skip
                        return False
                try:
                    stats = client.stats()
                except DcpdError:
                    time.sleep(0.2)
                    continue
                if stats.get("prefill_peers") == self.args.prefill and stats.get("decode_peers") == self.args.decode:
                    return True
                time.sleep(0.2)
        return False

    def describe(self) -> dict[str, object]:
        pids: dict[str, list[int]] = {}
        for child in self.children:
            pids.setdefault(child.role, []).append(child.proc.pid)
        return {"frontend": self.frontend, "router_endpoint": self.router_endpoint, "pids": pids}

    def supervise(self) -> int:
        """Until a signal: watch the children. Returns the exit status."""
        router = self.children[0]
        reported: set[int] = set()
        while not self.stopping:
            if router.proc.poll() is not None:
                _log("router exited; stopping the cluster", exit_code=router.proc.returncode)
                self.stop()
                return 1
            for child in self.children[1:]:
                if child.proc.poll() is not None and child.proc.pid not in reported:
                    reported.add(child.proc.pid)
                    _log("peer exited", role=child.role, name=child.name, exit_code=child.proc.returncode)
            time.sleep(0.2)
        return self.stop()

    def stop(self) -> int:
        """Drain: the router first, then the peers. One budget for all (two drains + margin); whatever
        outlives it, or everything after a second signal, gets SIGKILL."""
        Notifier().notify("STOPPING=1")
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
                if code != 0:  # a peer killed earlier counts too: the cluster did not end cleanly
                    status = status or (code if code > 0 else 1)
        shutil.rmtree(self.runtime, ignore_errors=True)
        _log("cluster stopped", exit_code=status)
        return status


def run(args: argparse.Namespace) -> int:
    if args.prefill < 1 or args.decode < 1:
        print("dcpd cluster: --prefill and --decode must be >= 1", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"dcpd cluster: bad config: {exc}", file=sys.stderr)
        return EX_CONFIG
    cluster = Cluster(args, args.frontend or config.server.frontend, config.server.drain_timeout_s)

    def on_signal(signum: int, _frame: object) -> None:
        cluster.force = cluster.stopping  # a second signal while draining: kill now
        cluster.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start()
    if not cluster.wait_ready(args.ready_timeout):
        if not cluster.stopping:
            _log("cluster not ready in time; stopping", timeout_s=args.ready_timeout)
        cluster.stop()
        return 0 if cluster.stopping else 1
    print(json.dumps({"event": "cluster ready", **cluster.describe()}), flush=True)
    Notifier().notify("READY=1", f"STATUS=cluster serving on {cluster.frontend}")
    return cluster.supervise()
