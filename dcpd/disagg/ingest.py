"""The decode peer's KV thread: receives chunks into reserved blocks while the engine keeps decoding.

It owns the KV ROUTER socket and the KVReceiver. The event loop tells it which
requests to expect and which to cancel through a queue; it reports back through
callbacks run with `loop.call_soon_threadsafe`. A cancelled request's blocks are
only freed after this thread confirms it will write no more into them
(`on_cancelled`), so a late chunk can never land in blocks given to someone else.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import structlog
import zmq

from dcpd.disagg.transfer import KVAck, KVReceiver
from dcpd.kv.cache import PagedKVCache
from dcpd.server.endpoint import bind, close_socket

log = structlog.get_logger("dcpd.ingest")


def bind_kv_socket(context: zmq.Context, cache: PagedKVCache, endpoint: str) -> zmq.Socket:
    """The decode peer's KV ROUTER. No frame a sender may legally send is larger than one slab of
    every block in the cache, so anything larger is refused by libzmq (the sender is disconnected)
    before it is buffered."""
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)  # flow control is the reservation, not a message count
    sock.setsockopt(zmq.MAXMSGSIZE, cache.num_blocks * cache.block_size * cache.head_dim * cache.kv.element_size())
    try:
        bind(sock, endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


class KVIngest:
    def __init__(
        self,
        cache: PagedKVCache,
        socket: zmq.Socket,
        *,
        on_done: Callable[[str, KVAck], None],
        on_cancelled: Callable[[str], None],
        on_crash: Callable[[], None],
    ) -> None:
        """`socket` is a bound ROUTER from a sync context; from `start()` on, only this thread uses it.
        The callbacks run in this thread; `on_crash()` means it died of a bug (the daemon must exit)."""
        self.receiver = KVReceiver(cache)
        self.on_crash = on_crash
        self.socket = socket
        self.on_done = on_done
        self.on_cancelled = on_cancelled
        self.commands: queue.SimpleQueue[tuple[str, str, list[int]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="dcpd-kv-ingest", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self.thread.start()

    def expect(self, key: str, block_ids: list[int]) -> None:
        self.commands.put(("expect", key, block_ids))

    def cancel(self, key: str) -> None:
        self.commands.put(("cancel", key, []))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            what, key, blocks = command
            if what == "expect":
                self.receiver.expect(key, blocks)  # keys are unique: the engine refused duplicates
            else:
                self.receiver.cancel(key)
                self.on_cancelled(key)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("the KV ingest thread died")
            self.on_crash()
            raise
        finally:
            close_socket(self.socket, linger=0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            if not self.socket.poll(20):
                continue
            # An `expect` queued while we polled precedes the chunk (the router sends the prefill
            # only after the reservation was made): apply it before handling the message.
            self._apply_commands()
            ack = self.receiver.serve_once(self.socket, timeout_ms=0)
            if ack is not None and ack.request_id == self.receiver.last_ended:  # not a stray chunk's refusal
                self.on_done(ack.request_id, ack)
        self._apply_commands()
