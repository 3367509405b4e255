"""Binding a ZeroMQ socket without taking an ipc address over from a live daemon, and giving it up.

libzmq binds an ipc endpoint by unlinking whatever socket file is at the path, so a second daemon
given the same path would silently take it over from the first (which keeps running, unreachable),
and it leaves the file behind when the socket closes. So a socket bound to an ipc path here holds
an exclusive lock on PATH.lock for as long as it is bound (the kernel drops it if the process dies):
two daemons starting at the same instant cannot both pass the check. `close_socket` removes the
socket file and the lock file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import weakref

import zmq


class _IpcHold:
    """An exclusive flock on PATH.lock: this process binds, or is bound to, the ipc path PATH."""

    def __init__(self, path: str) -> None:
        self.path, self.lock_path = path, f"{path}.lock"
        self.fd: int | None = None
        while self.fd is None:
            # Read-only is enough for flock; 0644 lets a daemon of another user lock a file one left behind.
            try:
                fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                raise zmq.ZMQError(exc.errno or errno.EIO, f"ipc://{path}: cannot open its lock file: {exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The holder before us may have removed the file between our open and our lock: try again.
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except BlockingIOError:
                os.close(fd)
                raise zmq.ZMQError(
                    errno.EADDRINUSE, f"ipc://{path}: another process is binding or bound there ({self.lock_path} "
                    "is locked) (Address in use)"
                ) from None  # fmt: skip
            except FileNotFoundError:
                same = False
            except OSError as exc:  # no locks on this file system, ...
                os.close(fd)
                why = f"ipc://{path}: cannot lock {self.lock_path}: {exc}"
                raise zmq.ZMQError(exc.errno or errno.EIO, why) from None
            if same:
                self.fd = fd
            else:
                os.close(fd)

    def release(self, *, remove_socket_file: bool) -> None:
        if self.fd is None:
            return
        try:
            for path in (self.path, self.lock_path) if remove_socket_file else (self.lock_path,):
                try:
                    os.unlink(path)
                except OSError:  # gone already, or a directory we may not write: nothing to tidy
                    pass
        finally:
            os.close(self.fd)  # unlinked first: whoever locks next works on a new file
            self.fd = None

    def __del__(self) -> None:  # a socket dropped without close_socket: give the lock up at least
        if self.fd is not None:
            os.close(self.fd)


_holds: weakref.WeakKeyDictionary[zmq.Socket, _IpcHold] = weakref.WeakKeyDictionary()


def bind(sock: zmq.Socket, endpoint: str) -> None:
    """`sock.bind(endpoint)`, refusing an ipc path another process holds or listens on (a stale socket
    file, with nobody listening, is still replaced). Close the socket with `close_socket`."""
    path = endpoint.removeprefix("ipc://")
    if not endpoint.startswith("ipc://") or path.startswith("@") or path == "*":
        sock.bind(endpoint)  # tcp, Linux's abstract namespace, a fresh temporary path: nothing to take over
        return
    hold = _IpcHold(path)
    try:
        if _listening(path):  # a process that does not take the lock (not dcpd, or an older one)
            raise zmq.ZMQError(errno.EADDRINUSE, f"{endpoint}: another process is listening there (Address in use)")
        sock.bind(endpoint)
    except BaseException:
        hold.release(remove_socket_file=False)
        raise
    _holds[sock] = hold


def close_socket(sock: zmq.Socket, linger: int) -> None:
    """Close a socket; an ipc path `bind` bound it to is removed and given up."""
    sock.close(linger=linger)
    if (hold := _holds.pop(sock, None)) is not None:
        hold.release(remove_socket_file=True)


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:  # no file, a stale one (ECONNREFUSED), not a socket
            return False
    return True
