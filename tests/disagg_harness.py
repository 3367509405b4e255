"""Start a router and its peers as separate real processes (the fault tests kill them one by one)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time

from dcpd.client import Client
from tests.daemon_harness import DaemonProcess, start_daemon

FAST = ["disagg.heartbeat_interval_s=0.2", "disagg.peer_timeout_s=1.0", 'logging.format="json"']


class Fleet:
    def __init__(self, *settings: str) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="dfl", dir="/tmp")  # ipc paths must stay short
        self.router_endpoint = f"ipc://{self.tmpdir}/r"
        self.settings = [*FAST, f"disagg.router_endpoint={json.dumps(self.router_endpoint)}", *settings]
        self.router = start_daemon(*self.settings, extra_args=["--role", "router"])
        self.peers: dict[str, DaemonProcess] = {}
        self._count = 0

    @property
    def frontend(self) -> str:
        return self.router.endpoint

    def add(self, role: str, *settings: str, wait: bool = True) -> str:
        """Start a peer; with `wait`, until it is ready (a peer that exits first raises RuntimeError)."""
        self._count += 1
        name = f"{role}-{self._count}"
        extra = [f"disagg.peer_name={json.dumps(name)}"]
        if role == "decode":
            extra.append(f'disagg.kv_endpoint="ipc://{self.tmpdir}/kv{self._count}"')
        self.peers[name] = start_daemon(*self.settings, *extra, *settings, extra_args=["--role", role],
                                        wait_ready=False)  # fmt: skip
        if wait:
            self.peers[name].wait_for("READY=1", 120)
        return name

    def wait_registered(self, timeout: float = 120.0) -> dict:
        """Until the router's registry is exactly the running peers."""
        deadline = time.monotonic() + timeout
        with Client(self.frontend) as client:
            while True:
                stats = client.stats()
                live = {k.split(".")[1] for k in stats if k.startswith("peer.")}
                alive = {name for name, d in self.peers.items() if d.proc.poll() is None}
                if live == alive:
                    return stats
                if time.monotonic() > deadline:
                    raise TimeoutError(f"router sees {sorted(live)}, running: {sorted(alive)}")
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        self.peers[name].proc.kill()
        self.peers[name].proc.wait(10)

    def stop(self) -> dict[str, int]:
        codes = {"router": self.router.stop(60)}
        for name, peer in self.peers.items():
            codes[name] = peer.stop(60)
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return codes
