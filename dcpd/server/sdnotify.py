"""systemd notifications, written against $NOTIFY_SOCKET directly (one datagram per message)."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = None
        if address:
            # a leading "@" means the Linux abstract namespace
            self.address = "\0" + address[1:] if address.startswith("@") else address

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send e.g. notify("READY=1", "STATUS=serving"); False when not under systemd or the send failed."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # never stall the event loop on a full receiver queue
                sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:  # includes BlockingIOError: the message is dropped, the next one may pass
            return False


def watchdog_interval_s() -> float | None:
    """Half of WATCHDOG_USEC, if systemd asked for a watchdog for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None
