"""Binding a ZeroMQ socket without taking an ipc address over from a live daemon."""

from __future__ import annotations

import errno
import socket

import zmq


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """`sock.bind(endpoint)`, refusing an ipc path a running process listens on.

    libzmq binds an ipc endpoint by unlinking whatever socket file is at the path, so a second daemon
    given the same path would silently take it over from the first (which keeps running, unreachable).
    A stale file (nobody listening) is still replaced."""
    if endpoint.startswith("ipc://") and _listening(endpoint.removeprefix("ipc://")):
        raise zmq.ZMQError(errno.EADDRINUSE, f"{endpoint}: another process is listening there (Address in use)")
    sock.bind(endpoint)


def _listening(path: str) -> bool:
    if path.startswith("@"):  # Linux abstract namespace: no file to take over, bind fails by itself
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:  # no file, a stale one (ECONNREFUSED), not a socket
            return False
    return True
