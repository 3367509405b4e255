"""Start the real daemon as a subprocess; readiness via a NOTIFY_SOCKET the test owns."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProcess:
    proc: subprocess.Popen
    endpoint: str
    notify: socket.socket
    tmpdir: str
    metrics_port: int
    notifications: list[str] = field(default_factory=list)

    def read_notifications(self, timeout: float = 0.0) -> list[str]:
        self.notify.settimeout(timeout if timeout > 0 else 0.001)
        try:
            while True:
                data = self.notify.recv(4096).decode()
                self.notifications.extend(data.split("\n"))
                self.notify.settimeout(0.001)
        except (TimeoutError, BlockingIOError):
            pass
        return self.notifications

    def log_text(self) -> str:
        with open(f"{self.tmpdir}/log", errors="replace") as f:
            return f.read()

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.read_notifications(0.1):
            if self.proc.poll() is not None:
                out = self.log_text()
                raise RuntimeError(f"daemon exited with {self.proc.returncode} before {line}: {out[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"daemon did not send {line} in {timeout} s")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.notify.close()
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_daemon(
    *overrides: str,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
    ready_timeout: float = 120.0,
    wait_ready: bool = True,
) -> DaemonProcess:
    tmpdir = tempfile.mkdtemp(prefix="dcpd", dir="/tmp")  # ipc paths must stay short
    endpoint = f"ipc://{tmpdir}/f"
    notify_path = f"{tmpdir}/n"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    port = free_port()
    args = [sys.executable, "-m", "dcpd.cli", "serve", "--frontend", endpoint, "--set", f"metrics.port={port}"]
    for item in overrides:
        args += ["--set", item]
    args += extra_args or []
    proc_env = {**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})}
    # the log goes to a file: a pipe nobody reads would block the daemon once it fills
    with open(f"{tmpdir}/log", "w") as log_file:
        proc = subprocess.Popen(args, env=proc_env, stdout=log_file, stderr=subprocess.STDOUT)
    daemon = DaemonProcess(proc, endpoint, notify, tmpdir, port)
    if not wait_ready:
        return daemon
    try:
        daemon.wait_for("READY=1", ready_timeout)
    except Exception:
        daemon.stop(5)
        raise
    return daemon
