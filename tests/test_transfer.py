"""KV transfer: a request's blocks cross a real socket into another cache, checked on arrival."""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
import threading
import time

import msgspec
import pytest
import torch
import zmq

from dcpd.disagg.transfer import KVChunkHeader, KVReceiver, KVSender, _as_bytes, checksum, keep_frame_memory
from dcpd.kv.cache import PagedKVCache


def filled_cache(dtype: torch.dtype = torch.float32, blocks: int = 64, layers: int = 4) -> PagedKVCache:
    cache = PagedKVCache(layers, blocks, 16, 2, 8, dtype=dtype)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(0)).to(dtype))
    return cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers_per_chunk", [1, 3])
@pytest.mark.parametrize("scattered", [False, True])  # consecutive blocks: zero-copy slabs; else staged
@pytest.mark.parametrize("generic", [False, True])  # receive frames, then scatter: a GPU cache's path
def test_request_kv_crosses_a_socket_intact(
    dtype: torch.dtype, layers_per_chunk: int, scattered: bool, generic: bool
) -> None:
    src = filled_cache(dtype)
    dst = PagedKVCache(4, 80, 16, 2, 8, dtype=dtype)
    src_blocks = [5, 9, 10, 11, 40, 2] if scattered else [20, 21, 22, 23, 24, 25]
    dst_blocks = dst.pool.allocate(len(src_blocks))
    if scattered:  # runs of 2, 1, 2 and 1 consecutive blocks
        dst_blocks = [dst_blocks[i] for i in (4, 5, 0, 2, 3, 1)]
    receiver = KVReceiver(dst)
    if generic:
        receiver.views = None
    receiver.expect("r1", dst_blocks)
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        acks = []

        def serve() -> None:
            while not acks:
                ack = receiver.serve_once(router, timeout_ms=10000)
                if ack is not None:
                    acks.append(ack)

        thread = threading.Thread(target=serve)
        thread.start()
        sender = KVSender(src, f"ipc://{tmp}/kv", context=ctx)
        sent = sender.send_request("r1", src_blocks, layers_per_chunk=layers_per_chunk)
        ack = sender.wait_ack(10)
        thread.join(10)
        sender.close()
        router.close(linger=0)
        ctx.term()
    assert ack.ok and ack.request_id == "r1" and ack.bytes == sent and ack.chunks == -(-4 // layers_per_chunk)
    assert torch.equal(dst.gather(dst_blocks), src.gather(src_blocks))
    assert "r1" not in receiver.incoming


def chunk(cache: PagedKVCache, blocks: list[int], **changes) -> tuple[bytes, list[memoryview]]:
    data = cache.gather(blocks, layers=slice(0, 1))
    slabs = [_as_bytes(data[0, kv, h].contiguous()) for kv in range(2) for h in range(data.shape[2])]
    fields = dict(request_id="r", seq=0, layer_start=0, layer_end=1, block_offset=0, num_blocks=len(blocks),
                  dtype="float32", shape=list(data.shape), checksum=checksum(*slabs), last=False)  # fmt: skip
    fields.update(changes)
    return msgspec.msgpack.encode(KVChunkHeader(**fields)), slabs


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq": 1}, "seq 1 arrived, expected 0"),
        ({"dtype": "bfloat16"}, "dtype bfloat16 does not match"),
        ({"checksum": 12345}, "checksum mismatch"),
        ({"shape": [1, 2, 2, 2, 8, 8]}, "does not match this cache's layout"),
        ({"layer_end": 9}, "outside 0..4"),
        ({"block_offset": 2}, "exceed the 2 blocks reserved"),
        ({"request_id": "other"}, "'other' is not expected"),
        ({"v": 7}, "transfer version 7"),
    ],
)
def test_bad_chunks_are_refused_and_end_the_request(changes: dict, message: str) -> None:
    src = filled_cache()
    dst = PagedKVCache(4, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    reserved = dst.pool.allocate(2)
    receiver.expect("r", reserved)
    ack = receiver.handle(*chunk(src, [1, 2], **changes))
    assert ack is not None and not ack.ok and message in ack.error
    if changes.get("request_id") != "other":
        assert "r" not in receiver.incoming  # the caller frees the blocks
    others = [b for b in range(16) if b not in reserved]
    assert dst.gather(others).abs().sum() == 0  # never a byte outside the request's reserved blocks
    if "checksum" not in changes:  # a bad header is refused before anything is written
        assert dst.kv.abs().sum() == 0


def test_chunks_from_another_connection_or_after_the_end_change_nothing() -> None:
    """Once a connection's chunk was accepted for a request, only that connection may send it more: a
    chunk from another one (here a seq that would otherwise fail the request) is refused and the
    transfer goes on. After the last chunk, a resent chunk is refused and names no ended request."""
    src = filled_cache()
    dst = PagedKVCache(4, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    reserved = dst.pool.allocate(2)
    receiver.expect("r", reserved)
    layers = [chunk(src, [1, 2])]
    for layer in range(1, 4):
        data = src.gather([1, 2], layers=slice(layer, layer + 1))
        slabs = [_as_bytes(data[0, kv, h].contiguous()) for kv in range(2) for h in range(data.shape[2])]
        header = KVChunkHeader(request_id="r", seq=layer, layer_start=layer, layer_end=layer + 1, block_offset=0,
                               num_blocks=2, dtype="float32", shape=list(data.shape), checksum=checksum(*slabs),
                               last=layer == 3)  # fmt: skip
        layers.append((msgspec.msgpack.encode(header), slabs))
    assert receiver.handle(*layers[0], sender=b"a") is None
    ack = receiver.handle(*layers[0], sender=b"b")
    assert not ack.ok and "being sent by another connection" in ack.error and receiver.last_ended is None
    assert receiver.handle(*layers[1], sender=b"a") is None and receiver.handle(*layers[2], sender=b"a") is None
    ack = receiver.handle(*layers[3], sender=b"a")
    assert ack.ok and receiver.last_ended == "r"
    assert torch.equal(dst.gather(reserved), src.gather([1, 2]))
    ack = receiver.handle(*layers[3], sender=b"a")
    assert not ack.ok and "not expected" in ack.error and receiver.last_ended is None


def test_truncated_payload_and_missing_layers() -> None:
    src = filled_cache()
    dst = PagedKVCache(4, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    receiver.expect("r", dst.pool.allocate(2))
    header, slabs = chunk(src, [1, 2])
    ack = receiver.handle(header, [*slabs[:-1], slabs[-1][:-4]])
    assert ack is not None and "slab has" in ack.error
    receiver.expect("r", [0, 1])
    ack = receiver.handle(header, slabs[:-1])
    assert ack is not None and "slab frames" in ack.error
    receiver.expect("r", [0, 1])
    ack = receiver.handle(*chunk(src, [1, 2], last=True))  # layer 0 only, yet marked last
    assert ack is not None and not ack.ok and "6 (layer, block) pairs are missing, from layer 1 block 0" in ack.error
    receiver.expect("r", [0, 1])
    ack = receiver.handle(header, [*slabs, slabs[0]])
    assert ack is not None and "more than the 4 slab frames" in ack.error
    ack = receiver.handle(b"\x81\xa1x\x01", slabs)
    assert ack is not None and "bad chunk header" in ack.error


@pytest.mark.parametrize("blocks", [[3, 4], [4, 3]])  # received in place, and received then scattered
def test_a_bad_message_on_the_socket_is_drained_and_the_next_one_lands(blocks: list[int]) -> None:
    src = filled_cache(layers=1)
    dst = PagedKVCache(1, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    header, slabs = chunk(src, [1, 2], last=True)
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"ipc://{tmp}/kv")
        bad = [
            ([header, *slabs[:2], bytes(slabs[2])[:-4], slabs[3]], "slab has 1020 bytes"),  # short, mid-message
            ([header, slabs[0], bytes(slabs[1]) + b"tail", *slabs[2:]], "slab has 1028 bytes"),  # long: truncated
            ([header, *slabs, slabs[0]], "more than the 4 slab frames"),
            ([header], "got 1 frame"),
            ([msgspec.msgpack.encode({"v": 2}), *slabs], "bad chunk header"),
        ]
        for frames, message in bad:
            receiver.expect("r", blocks)
            dealer.send_multipart(frames)
            ack = receiver.serve_once(router, timeout_ms=10000)
            assert ack is not None and not ack.ok and message in ack.error, ack
            assert msgspec.msgpack.decode(dealer.recv()) == msgspec.structs.asdict(ack)
            receiver.cancel("r")
        receiver.expect("r", blocks)
        dealer.send_multipart([header, *slabs])
        ack = receiver.serve_once(router, timeout_ms=10000)
    assert ack is not None and ack.ok, ack.error
    assert torch.equal(dst.gather(blocks), src.gather([1, 2]))


def test_a_dead_receiver_fails_the_send_instead_of_hanging() -> None:
    import time

    src = filled_cache()
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp:
        ctx = zmq.Context()
        sender = KVSender(src, f"ipc://{tmp}/nobody", context=ctx, timeout_s=0.2)
        for blocks in ([20, 21, 22], [5, 9, 40]):  # zero-copy slabs, and staged ones
            start = time.monotonic()
            with pytest.raises(TimeoutError, match=r"took no KV for 0\.2 s"):
                sender.send_chunk("r", 0, blocks, layers=(0, 4), last=True)
            assert time.monotonic() - start < 5
        sender.close()
        ctx.term()


def test_the_kv_socket_refuses_a_frame_larger_than_any_slab_and_keeps_receiving() -> None:
    from dcpd.disagg.ingest import bind_kv_socket

    src = filled_cache(layers=1)
    dst = PagedKVCache(1, 16, 16, 2, 8)  # the largest legal slab: 16 blocks * 16 * 8 * 4 bytes = 8 KiB
    receiver = KVReceiver(dst)
    header, slabs = chunk(src, [1, 2], last=True)
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = bind_kv_socket(ctx, dst, f"ipc://{tmp}/kv")
        rogue = ctx.socket(zmq.DEALER)
        rogue.connect(f"ipc://{tmp}/kv")
        rogue.send_multipart([header, bytes(8 * 1024 + 1)])
        assert router.poll(500) == 0  # dropped by libzmq, with the connection that sent it
        sender = ctx.socket(zmq.DEALER)
        sender.connect(f"ipc://{tmp}/kv")
        receiver.expect("r", [3, 4])
        sender.send_multipart([header, *slabs])
        ack = receiver.serve_once(router, timeout_ms=10000)
    assert ack is not None and ack.ok, ack
    assert torch.equal(dst.gather([3, 4]), src.gather([1, 2]))


_FRAME_CHURN = """
import ctypes, resource, sys
from dcpd.disagg.transfer import keep_frame_memory
if sys.argv[1] == "keep":
    assert keep_frame_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 512 * 1024  # a slab frame
def burst():  # what libzmq's I/O thread does: a few frames alive at once, then all freed
    frames = [libc.malloc(size) for _ in range(8)]
    for frame in frames:
        ctypes.memset(frame, 1, size)
    for frame in frames:
        libc.free(frame)
burst()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def test_keep_frame_memory_stops_page_faults_on_reused_frame_memory() -> None:
    """In a child process (the setting is process-wide): 20 bursts of eight 512 KiB frames fault their
    pages in again each time under glibc's defaults, and reuse them once frame memory is kept."""
    if platform.libc_ver()[0] != "glibc":
        assert not keep_frame_memory()  # the setting only exists for glibc, and says so
        return
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", _FRAME_CHURN, mode], capture_output=True, text=True, check=True)
        faults[mode] = int(out.stdout)
    pages = 20 * 8 * 512 * 1024 // 4096
    assert faults["default"] > pages // 2, faults  # most pages faulted in again
    assert faults["keep"] < pages // 50, faults


def test_the_pusher_sends_nothing_for_a_request_cancelled_before_its_first_chunk() -> None:
    """Cancel (forget) can reach the push thread before the step thread queues the request's first
    chunk: that chunk and the rest are dropped, not sent to a decode peer that no longer expects them."""
    import queue as queue_module

    from dcpd.disagg.pusher import Chunk, KVPusher

    src = filled_cache(layers=2)
    dst = PagedKVCache(2, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    events: queue_module.SimpleQueue = queue_module.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        pusher = KVPusher(src, on_first_chunk=lambda key: events.put(("first", key)),
                          on_done=lambda key, ack, nbytes, s: events.put(("done", key, ack.ok)),
                          on_released=lambda key: events.put(("released", key)),
                          on_crash=lambda: events.put(("crash",)), send_timeout_s=5.0)  # fmt: skip
        pusher.start()
        try:
            pusher.forget("gone")
            assert events.get(timeout=10) == ("released", "gone")  # nothing of it was sent
            for seq, layers in enumerate(((0, 1), (1, 2))):
                pusher.push(Chunk("gone", f"ipc://{tmp}/kv", seq, [1, 2], 0, layers, last=seq == 1))
            receiver.expect("kept", [3, 4])
            for seq, layers in enumerate(((0, 1), (1, 2))):
                pusher.push(Chunk("kept", f"ipc://{tmp}/kv", seq, [1, 2], 0, layers, last=seq == 1))
            acks = []
            while not acks:
                acks = [a for a in [receiver.serve_once(router, timeout_ms=10000)] if a is not None]
            assert events.get(timeout=10) == ("first", "kept")
            assert events.get(timeout=10) == ("done", "kept", True)
            assert acks[0].ok and acks[0].request_id == "kept"
            assert router.poll(300) == 0  # nothing of "gone" ever arrived
            assert events.empty()
        finally:
            pusher.stop()
            router.close(linger=0)
    assert torch.equal(dst.gather([3, 4]), src.gather([1, 2]))


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_the_push_thread_and_its_zeromq_io_thread_run_at_the_configured_niceness() -> None:
    """On a CPU prefill peer the push shares cores with the compute; `nice` lowers the priority of
    the push thread and of the threads it starts (ZeroMQ's for its context; pyzmq's garbage collector when
    its send is the first zero-copy one here), and of nothing else in the process."""
    import os
    import queue as queue_module

    from dcpd.disagg.pusher import Chunk, KVPusher

    def tasks() -> set[int]:
        return {int(tid) for tid in os.listdir("/proc/self/task")}

    def niceness(tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    src, dst = filled_cache(layers=2), PagedKVCache(2, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    events: queue_module.SimpleQueue = queue_module.SimpleQueue()
    ours = niceness(threading.get_native_id())  # the test's own (a niced CI job: higher)
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        before = tasks()
        pusher = KVPusher(src, on_first_chunk=lambda key: None,
                          on_done=lambda key, ack, nbytes, s: events.put(("done", key, ack.ok)),
                          on_released=lambda key: None, on_crash=lambda: events.put(("crash",)),
                          send_timeout_s=5.0, nice=7)  # fmt: skip
        pusher.start()
        try:
            receiver.expect("r", [3, 4])
            pusher.push(Chunk("r", f"ipc://{tmp}/kv", 0, [1, 2], 0, (0, 2), last=True))
            while receiver.serve_once(router, timeout_ms=10000) is None:
                pass
            assert events.get(timeout=10) == ("done", "r", True)
            started = tasks() - before  # the push thread, ZeroMQ's I/O and reaper threads for its context
            assert pusher.thread.native_id in started and len(started) >= 3
            assert {tid: niceness(tid) for tid in started} == dict.fromkeys(started, max(7, ours))
            assert all(niceness(tid) == ours for tid in before & tasks())  # the rest of the process is untouched
        finally:
            pusher.stop()
            router.close(linger=0)


@pytest.mark.parametrize("small_last_chunk", [False, True])
def test_a_cancelled_transfer_frees_its_blocks_only_once_zeromq_no_longer_reads_them(small_last_chunk: bool) -> None:
    """Chunks go out zero-copy: ZeroMQ reads the blocks after `send` returns. A decode peer that takes
    nothing leaves them queued, so after a cancel the pusher must not release the blocks at once; it
    does when ZeroMQ lets go, or after the send timeout by closing that connection (dropping the
    queue). A transfer with nothing queued is released at once. The latest chunk's slabs may be
    small (a short last chunk): pyzmq must not copy them and report that message done at once."""
    import queue as queue_module

    from dcpd.disagg.pusher import Chunk, KVPusher

    src = PagedKVCache(4, 64, 16, 2, 64)  # one layer of 64 blocks: 4 slabs of 256 KiB (zero-copy)
    events: queue_module.SimpleQueue = queue_module.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        stuck = ctx.socket(zmq.ROUTER)
        stuck.setsockopt(zmq.RCVHWM, 1)  # takes one message, then nothing: the rest stays with the sender
        stuck.bind(f"ipc://{tmp}/kv")
        pusher = KVPusher(src, on_first_chunk=lambda key: None,
                          on_done=lambda key, ack, nbytes, s: events.put(("done", key, ack.ok)),
                          on_released=lambda key: events.put(("released", key, time.monotonic())),
                          on_crash=lambda: events.put(("crash",)), send_timeout_s=1.0)  # fmt: skip
        pusher.start()
        try:
            blocks = list(range(64))
            for seq in range(8):
                layers = (seq % 4, seq % 4 + 1)
                pusher.push(Chunk("r", f"ipc://{tmp}/kv", seq, blocks, 0, layers, last=False))
            if small_last_chunk:  # one block: 4 KiB slabs, under pyzmq's default copy threshold
                pusher.push(Chunk("r", f"ipc://{tmp}/kv", 8, [0], 0, (0, 1), last=False))
            time.sleep(0.3)  # sent into ZeroMQ's queue
            cancelled = time.monotonic()
            pusher.forget("r")
            with pytest.raises(queue_module.Empty):
                events.get(timeout=0.5)  # still queued: not released yet
            _, key, released = events.get(timeout=10)
            assert key == "r" and 0.9 < released - cancelled < 5
            assert f"ipc://{tmp}/kv" not in pusher.senders  # the stuck connection was closed
        finally:
            pusher.stop()
            stuck.close(linger=0)


def test_a_dead_decode_peer_does_not_hold_up_kv_bound_for_the_others() -> None:
    """One push thread serves every decode peer. Chunks for a peer that cannot take them (here: nobody
    listens) wait in that peer's backlog while chunks for a live peer go out; the dead peer's transfer
    fails once its backlog made no progress for the send timeout. A request cancelled while its chunks
    wait there had nothing in ZeroMQ: its blocks are released at once."""
    import queue as queue_module

    from dcpd.disagg.pusher import Chunk, KVPusher

    src = filled_cache(layers=2)
    dst = PagedKVCache(2, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    events: queue_module.SimpleQueue = queue_module.SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        pusher = KVPusher(src, on_first_chunk=lambda key: None,
                          on_done=lambda key, ack, nbytes, s: events.put((key, ack.ok, ack.error)),
                          on_released=lambda key: events.put((key, "released", None)),
                          on_crash=lambda: events.put(("crash",)),
                          send_timeout_s=3.0)  # fmt: skip
        pusher.start()
        try:
            receiver.expect("live", [3, 4])
            for key, endpoint in (("dead", f"ipc://{tmp}/nobody"), ("gone", f"ipc://{tmp}/nobody"),
                                  ("live", f"ipc://{tmp}/kv")):  # fmt: skip
                for seq, layers in enumerate(((0, 1), (1, 2))):
                    pusher.push(Chunk(key, endpoint, seq, [1, 2], 0, layers, last=seq == 1))
            pusher.forget("gone")
            assert events.get(timeout=10) == ("gone", "released", None)  # nothing of it reached ZeroMQ
            ack = None
            while ack is None:
                ack = receiver.serve_once(router, timeout_ms=10000)
            assert ack.ok and ack.request_id == "live"
            assert events.get(timeout=10) == ("live", True, None)  # before the dead peer's timeout
            key, ok, error = events.get(timeout=10)
            assert (key, ok) == ("dead", False)
            assert f"decode peer at ipc://{tmp}/nobody: took no KV for 3.0 s" in error
            assert f"ipc://{tmp}/nobody" not in pusher.senders and not pusher.backlog
        finally:
            pusher.stop()
            router.close(linger=0)
    assert torch.equal(dst.gather([3, 4]), src.gather([1, 2]))


def test_a_decode_peer_endpoint_zeromq_cannot_connect_to_fails_its_transfer_not_the_pusher() -> None:
    """An ipc path over the socket address limit cannot even be connected to: that transfer fails with
    the reason, and the push thread goes on serving other decode peers."""
    import queue as queue_module

    from dcpd.disagg.pusher import Chunk, KVPusher

    src = filled_cache(layers=2)
    dst = PagedKVCache(2, 16, 16, 2, 8)
    receiver = KVReceiver(dst)
    events: queue_module.SimpleQueue = queue_module.SimpleQueue()
    bad = "ipc:///tmp/" + "x" * 120
    with tempfile.TemporaryDirectory(prefix="dkv", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        pusher = KVPusher(src, on_first_chunk=lambda key: None,
                          on_done=lambda key, ack, nbytes, s: events.put((key, ack.ok, ack.error)),
                          on_released=lambda key: None, on_crash=lambda: events.put(("crash",)),
                          send_timeout_s=5.0)  # fmt: skip
        pusher.start()
        try:
            pusher.push(Chunk("bad", bad, 0, [1, 2], 0, (0, 2), last=True))
            key, ok, error = events.get(timeout=10)
            assert (key, ok) == ("bad", False) and f"cannot connect to the decode peer at {bad}" in error
            receiver.expect("good", [3, 4])
            pusher.push(Chunk("good", f"ipc://{tmp}/kv", 0, [1, 2], 0, (0, 2), last=True))
            ack = receiver.serve_once(router, timeout_ms=10000)
            assert ack is not None and ack.ok
            assert events.get(timeout=10) == ("good", True, None)
            assert pusher.thread.is_alive()
        finally:
            pusher.stop()
            router.close(linger=0)
