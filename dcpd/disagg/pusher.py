"""The prefill peer's transfer thread: pushes KV chunks to decode peers while the next step computes.

The step thread enqueues chunks (blocks whose KV is final); this thread owns one
KVSender (a DEALER) per decode peer, computes checksums, sends zero-copy, and
polls for acknowledgments. Results go back to the event loop through callbacks
run with `loop.call_soon_threadsafe`, so the engine is only touched by the loop.

Zero-copy means ZeroMQ reads the KV blocks after `send` returns, so a request's
blocks may only be freed once ZeroMQ has let go of its last message. Every way a
transfer ends goes through `_settle`: `on_done` (and `on_released` for a cancel)
is called only when the request's last message is released (its MessageTracker).
A stuck decode peer that takes none of it within the send timeout has its
connection closed, which discards what is queued for it; the trackers then
complete (libzmq closes asynchronously, within milliseconds).

A send never waits: a chunk for a decode peer that cannot take it now (not
connected, at its high-water mark, or no free staging buffer) waits in that
peer's backlog, so one dead or slow decode peer does not hold up the KV of
requests bound for the others. A backlog that makes no progress for the send
timeout fails its transfers and closes that connection.

The thread may run at a lower CPU priority (`nice`): on a CPU peer the push
shares cores with the model's compute, and every core the compute loses to it
stalls the whole step at its next barrier, while the push only needs to keep
up. The thread makes its own ZeroMQ context, whose I/O and reaper threads
libzmq starts with the first socket, from this thread: they inherit the
niceness. So does pyzmq's process-wide garbage-collector thread (which
completes zero-copy MessageTrackers) when this thread's send is the process's
first zero-copy one, as it is on a prefill peer.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import structlog
import zmq

from dcpd.disagg.transfer import KVAck, KVSender
from dcpd.kv.cache import PagedKVCache

log = structlog.get_logger("dcpd.pusher")

FORGOTTEN_KEYS = 4096


@dataclass(frozen=True)
class Chunk:
    key: str
    endpoint: str
    seq: int
    block_ids: list[int]
    block_offset: int
    layers: tuple[int, int]  # [start, end)
    last: bool
    first_token: int | None = None


@dataclass
class _Pending:
    endpoint: str
    started: float
    bytes: int = 0
    sender: KVSender | None = None  # the connection its latest message went out on
    tracker: zmq.MessageTracker | None = None  # of that message: released => all of them are


class _AllReleased:
    """Done once every tracker in it is (what `drop_all` waits for)."""

    def __init__(self, trackers: list[zmq.MessageTracker | _AllReleased]) -> None:
        self.trackers = trackers

    @property
    def done(self) -> bool:
        return all(tracker.done for tracker in self.trackers)


@dataclass
class _Unsettled:
    """A transfer that ended while ZeroMQ may still read its blocks; `then` runs once it cannot."""

    key: str | None  # None: everything a drop_all closed
    endpoint: str
    sender: KVSender | None  # the connection it was queued on (None: drop_all)
    tracker: zmq.MessageTracker | _AllReleased
    deadline: float  # connected: when to close the stuck connection; closed: when to stop waiting
    then: Callable[[], None]


def lower_thread_priority(nice: int) -> None:
    """Set the calling thread's niceness to `nice` unless it is already higher (Linux, where each
    thread has its own; threads it starts inherit it). Lowering a priority needs no privilege."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, thread, nice)
    except OSError as exc:
        log.warning("could not lower the KV push thread's priority", nice=nice, error=str(exc))


class KVPusher:
    def __init__(
        self,
        cache: PagedKVCache,
        *,
        on_first_chunk: Callable[[str], None],
        on_done: Callable[[str, KVAck, int, float], None],
        on_released: Callable[[str | None], None],
        on_crash: Callable[[], None],
        send_timeout_s: float,
        nice: int = 0,
    ) -> None:
        """Callbacks, called in this thread: `on_first_chunk(key)`; `on_done(key, ack, bytes, seconds)`
        when a transfer ends (acknowledged or failed) and its blocks may be freed; `on_released(key)`
        after `forget(key)`, and `on_released(None)` after `drop_all()`, once the blocks of what was
        forgotten may be freed; `on_crash()`: the thread died of a bug (the daemon must exit).
        `nice`: the thread's niceness (Linux; never below the process's own)."""
        self.cache = cache
        self.on_crash = on_crash
        self.on_first_chunk = on_first_chunk
        self.on_done = on_done
        self.on_released = on_released
        self.send_timeout_s = send_timeout_s
        self.nice = nice
        self.context: zmq.Context | None = None  # made in the thread (see the module docstring)
        self.queue: queue.SimpleQueue[Chunk | tuple[str, str] | None] = queue.SimpleQueue()
        self.senders: dict[str, KVSender] = {}
        self.pending: dict[str, _Pending] = {}  # key -> transfer awaiting its ack
        # Cancelled keys, newest last: a chunk the step thread queued after the cancel is not sent. Keys
        # are unique per attempt, so only the last few thousand can still have chunks in flight.
        self.forgotten: OrderedDict[str, None] = OrderedDict()
        self.dead_until: dict[str, float] = {}  # endpoint -> until when chunks for it fail at once
        self.unsettled: list[_Unsettled] = []
        self.backlog: dict[str, deque[Chunk]] = {}  # endpoint -> chunks waiting, in order, for it to take more
        self.stalled_since: dict[str, float] = {}  # endpoint -> when its backlog last made progress
        self.thread = threading.Thread(target=self._run, name="dcpd-kv-push", daemon=True)

    # -- called from other threads -------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def push(self, chunk: Chunk) -> None:
        self.queue.put(chunk)

    def forget(self, key: str) -> None:
        """The request was cancelled: send none of its chunks still queued here, stop waiting for its
        ack; `on_released(key)` follows once ZeroMQ no longer reads its blocks."""
        self.queue.put(("forget", key))

    def drop_peer(self, endpoint: str) -> None:
        """Close the connection to a dead decode peer, discarding what is queued for it."""
        self.queue.put(("drop", endpoint))

    def drop_all(self) -> None:
        """Close every connection (discarding what is queued); then `on_released(None)`."""
        self.queue.put(("drop_all", ""))

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(10)

    # -- the thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.nice:
            lower_thread_priority(self.nice)
        self.context = zmq.Context()
        try:
            self._loop()
        except BaseException:
            log.exception("the KV push thread died")
            self.on_crash()
            raise
        finally:
            for sender in self.senders.values():
                sender.socket.close(linger=0)
            self.context.term()

    def _loop(self) -> None:
        while True:
            try:
                item = self.queue.get(timeout=0.002 if self.pending or self.unsettled else 0.05)
            except queue.Empty:
                item = ()
            if item is None:
                return
            if isinstance(item, Chunk):
                self._send(item)
            elif item:
                self._command(*item)
            self._flush_backlogs()
            self._poll_acks()
            self._check_unsettled()

    def _command(self, what: str, arg: str) -> None:
        if what == "forget":
            self.forgotten[arg] = None
            if len(self.forgotten) > FORGOTTEN_KEYS:
                self.forgotten.popitem(last=False)
            self._settle(arg, self.pending.pop(arg, None), lambda: self.on_released(arg))
        elif what == "drop":
            sender = self.senders.pop(arg, None)
            if sender is not None:
                sender.socket.close(linger=0)
            self.backlog.pop(arg, None)
            self.stalled_since.pop(arg, None)
            for key in [k for k, p in self.pending.items() if p.endpoint == arg]:
                self._fail(key, f"decode peer at {arg} is gone")
        elif what == "drop_all":
            for endpoint in list(self.senders):
                self._command("drop", endpoint)
            # What was queued is being discarded (asynchronously): release once libzmq let go of it all.
            everything = _AllReleased([item.tracker for item in self.unsettled])
            deadline = time.monotonic() + self.send_timeout_s
            self.unsettled.append(_Unsettled(None, "", None, everything, deadline, lambda: self.on_released(None)))

    def _settle(self, key: str, state: _Pending | None, then: Callable[[], None]) -> None:
        """Run `then` now if ZeroMQ no longer reads the request's blocks; else once it does not."""
        if state is None:  # no transfer in flight, but one that already ended may still be settling
            ending = next((u for u in self.unsettled if u.key == key), None)
            if ending is not None:
                self.unsettled.append(dataclasses.replace(ending, then=then))
                return
        if state is None or state.sender is None or state.tracker is None or state.tracker.done:
            then()  # nothing sent, or all of it sent
            return
        deadline = time.monotonic() + self.send_timeout_s
        self.unsettled.append(_Unsettled(key, state.endpoint, state.sender, state.tracker, deadline, then))

    def _check_unsettled(self) -> None:
        if not self.unsettled:
            return
        now = time.monotonic()
        waiting, self.unsettled = self.unsettled, []
        for item in waiting:
            if item.tracker.done:  # sent, or discarded by a closed connection
                item.then()
            elif now <= item.deadline:
                self.unsettled.append(item)
            elif item.sender is not None and self.senders.get(item.endpoint) is item.sender:
                log.warning(
                    "a decode peer took none of an ended transfer's queued KV in time; closing the connection",
                    key=item.key,
                    endpoint=item.endpoint,
                    timeout_s=self.send_timeout_s,
                )
                self._command("drop", item.endpoint)  # discards the queue: the tracker completes soon
                item.deadline = now + self.send_timeout_s
                self.unsettled.append(item)
            else:  # closed long ago and libzmq still holds it: it can send nothing more from these blocks
                log.error("ZeroMQ kept KV frames past closing their connection; releasing the blocks",
                          key=item.key, endpoint=item.endpoint)  # fmt: skip
                item.then()

    def _sender(self, endpoint: str) -> KVSender:
        sender = self.senders.get(endpoint)
        if sender is None:
            sender = KVSender(self.cache, endpoint, context=self.context, timeout_s=self.send_timeout_s)
            self.senders[endpoint] = sender
        return sender

    def _send(self, chunk: Chunk) -> None:
        if chunk.key in self.forgotten:  # cancelled before (or while) its first chunks were queued
            return
        if chunk.seq == 0:
            self.pending[chunk.key] = _Pending(chunk.endpoint, time.monotonic())
            self.on_first_chunk(chunk.key)
        if self._stale(chunk):  # forgotten (cancelled) or already failed
            return
        if self.dead_until.get(chunk.endpoint, 0.0) > time.monotonic():
            self._fail(chunk.key, f"decode peer at {chunk.endpoint} is not taking KV")
            return
        try:
            sender = self._sender(chunk.endpoint)
        except zmq.ZMQError as exc:  # an endpoint ZeroMQ cannot connect to at all
            self._fail(chunk.key, f"cannot connect to the decode peer at {chunk.endpoint}: {exc}")
            self._mark_dead(chunk.endpoint)
            return
        if chunk.endpoint in self.backlog or not sender.can_send_now(chunk.block_ids):
            self._wait_in_backlog(chunk)
        else:
            self._transmit(chunk)  # it goes to the backlog itself if the peer cannot take it after all

    def _wait_in_backlog(self, chunk: Chunk, *, first: bool = False) -> None:
        """Queue the chunk behind those already waiting for its peer (`first`: back at the head)."""
        waiting = self.backlog.get(chunk.endpoint)
        if waiting is None:
            waiting = self.backlog[chunk.endpoint] = deque()
            self.stalled_since[chunk.endpoint] = time.monotonic()
        if first:
            waiting.appendleft(chunk)
        else:
            waiting.append(chunk)

    def _flush_backlogs(self) -> None:
        """Send what each decode peer can take now; fail the transfers of one that took nothing for the
        send timeout, and close its connection."""
        now = time.monotonic()
        for endpoint, waiting in list(self.backlog.items()):
            sender = self.senders[endpoint]  # a drop removes the backlog with the connection
            while waiting and endpoint in self.backlog:  # a failed send drops the peer and its backlog
                if self._stale(waiting[0]):
                    waiting.popleft()  # its request was cancelled or failed while the chunk waited
                elif not sender.can_send_now(waiting[0].block_ids):
                    break
                elif self._transmit(waiting.popleft()):
                    self.stalled_since[endpoint] = now
                else:
                    break  # it would have waited after all: it is back at the head
            if endpoint not in self.backlog:
                continue
            if not waiting:
                del self.backlog[endpoint], self.stalled_since[endpoint]
            elif now - self.stalled_since[endpoint] > self.send_timeout_s:
                for key in dict.fromkeys(chunk.key for chunk in waiting):
                    self._fail(key, f"decode peer at {endpoint}: took no KV for {self.send_timeout_s} s")
                self._command("drop", endpoint)
                self._mark_dead(endpoint)

    def _mark_dead(self, endpoint: str) -> None:
        """Fail chunks for this peer at once for the next send timeout (and forget expired marks)."""
        now = time.monotonic()
        self.dead_until = {e: until for e, until in self.dead_until.items() if until > now}
        self.dead_until[endpoint] = now + self.send_timeout_s

    def _stale(self, chunk: Chunk) -> bool:
        return chunk.key not in self.pending or chunk.key in self.forgotten

    def _transmit(self, chunk: Chunk) -> bool:
        """Send without waiting. False if the peer cannot take it now after all (it went away since
        `can_send_now`): nothing was sent, and the chunk is back at the head of its backlog. Callers
        pass only chunks whose request is still pending (not `_stale`)."""
        state = self.pending[chunk.key]
        sender = self.senders[chunk.endpoint]
        try:
            state.bytes += sender.send_chunk(
                chunk.key, chunk.seq, chunk.block_ids, layers=chunk.layers, block_offset=chunk.block_offset,
                last=chunk.last, first_token=chunk.first_token, wait=False,
            )  # fmt: skip
        except zmq.Again:
            self._wait_in_backlog(chunk, first=True)
            return False
        except Exception as exc:
            log.exception("sending KV failed", key=chunk.key)
            self._fail(chunk.key, f"sending KV to {chunk.endpoint} failed: {exc!r}")
            return True
        state.sender, state.tracker = sender, sender.last_tracker
        return True

    def _fail(self, key: str, error: str) -> None:
        state = self.pending.pop(key, None)
        if state is not None:
            ack = KVAck(request_id=key, ok=False, chunks=0, bytes=state.bytes, error=error)
            self._settle(key, state, lambda: self.on_done(key, ack, state.bytes, time.monotonic() - state.started))

    def _poll_acks(self) -> None:
        for endpoint, sender in list(self.senders.items()):
            while True:
                try:
                    ack = sender.poll_ack()
                except Exception:
                    log.exception("bad KV acknowledgment", endpoint=endpoint)
                    continue
                if ack is None:
                    break
                state = self.pending.pop(ack.request_id, None)
                if state is None:
                    log.debug("ack for a request no longer pending", key=ack.request_id, ok=ack.ok)
                    continue
                seconds = time.monotonic() - state.started  # a failed ack may come with chunks still queued
                self._settle(ack.request_id, state, partial(self.on_done, ack.request_id, ack, state.bytes, seconds))
