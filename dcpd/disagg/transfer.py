"""KV cache transfer between peers over ZeroMQ: zero-copy multipart frames, checked on arrival.

One message per chunk (a layer range of a request's blocks):

    [KVChunkHeader (msgpack), slab, slab, ...]

The payload is the chunk as [n_layers, 2, kv_heads, n_blocks, block_size,
head_dim] in the cache's dtype (`PagedKVCache.gather` layout), sent as one frame
per (layer, K/V, head) slab of n_blocks * block_size * head_dim elements. When
the request's blocks are consecutive ids, each slab is a contiguous slice of the
head-major cache and goes out with `copy=False` straight from the cache memory
(the blocks are held until the receiver acknowledges and ZeroMQ has released the
message: `last_tracker`, which KVPusher waits on before anything frees them).
Otherwise the chunk is gathered into a reused staging buffer
(pinned host memory when the cache is on a GPU), reused only once ZeroMQ has
released it (MessageTracker). The receiver validates the header against the
request's reservation first, then receives each slab frame straight into its
slice of the reserved blocks (`recv_into`: libzmq's one copy) and hashes it
there while it is still in the CPU cache; scattered blocks are received as
frames and scattered. Chunks of a request must arrive in order (`seq`); the
header carries an xxh3-64 checksum over the slabs in order. The last chunk is
acknowledged with a KVAck.
"""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass
from typing import Protocol

import msgspec
import numpy as np
import torch
import xxhash
import zmq

from dcpd.kv.cache import PagedKVCache

TRANSFER_VERSION = 2
STAGING_BUFFERS = 3  # chunks in flight per sender before it waits for ZeroMQ to release one


# gc=False on the per-chunk structs: they hold only scalars and lists of ints (no cycles possible), and
# tracking thousands of them a second only feeds the garbage collector.
class KVChunkHeader(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, gc=False):
    v: int = TRANSFER_VERSION
    request_id: str
    seq: int  # 0, 1, 2, ... per request
    layer_start: int
    layer_end: int  # exclusive
    block_offset: int  # index of this chunk's first block in the request's block list
    num_blocks: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: list[int]
    checksum: int  # xxh3-64 of the payload bytes
    last: bool  # the request's final chunk: every (layer, block) must have arrived by now
    first_token: int | None = None  # on the last chunk: the token the prefill peer sampled


class KVAck(msgspec.Struct, kw_only=True, gc=False):
    request_id: str
    ok: bool
    chunks: int
    bytes: int
    error: str | None = None
    first_token: int | None = None  # echoed from the last chunk


class TransferError(ValueError):
    """A chunk that cannot be accepted; the message names the field."""


_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(KVChunkHeader)
_ack_decoder = msgspec.msgpack.Decoder(KVAck)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor (any dtype, bf16 included), without copying."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")


def checksum(*buffers: memoryview) -> int:
    """xxh3-64 over the buffers in order (the same value as over their concatenation)."""
    digest = xxhash.xxh3_64()
    for buffer in buffers:
        digest.update(buffer)
    return digest.intdigest()


def consecutive(block_ids: list[int]) -> bool:
    return all(b == block_ids[0] + i for i, b in enumerate(block_ids))


def runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """(first id, length, position in `block_ids`) of each run of consecutive ids, in order."""
    out: list[tuple[int, int, int]] = []
    for position, block in enumerate(block_ids):
        if out and out[-1][0] + out[-1][1] == block:
            first, length, start = out[-1]
            out[-1] = (first, length + 1, start)
        else:
            out.append((block, 1, position))
    return out


class SlabViews:
    """Byte views of a CPU cache's slabs, by arithmetic on one memoryview of the whole cache (no
    tensor is made per slab). A slab is (layer, K/V, head) of a run of consecutive blocks: contiguous
    in the head-major layout."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.memory = _as_bytes(cache.kv.view(-1))
        self.heads = cache.num_kv_heads
        self.num_blocks = cache.num_blocks
        self.block_bytes = cache.block_size * cache.head_dim * cache.kv.element_size()

    def slabs(self, layers: tuple[int, int], first_block: int, num_blocks: int) -> list[memoryview]:
        """In the wire order: layer, then K/V, then head."""
        start, end = layers
        size = num_blocks * self.block_bytes
        plane = self.num_blocks * self.block_bytes  # one (layer, K/V, head) row of blocks
        first = first_block * self.block_bytes
        return [
            self.memory[row * plane + first : row * plane + first + size]
            for row in range(start * 2 * self.heads, end * 2 * self.heads)
        ]


# -- sending ----------------------------------------------------------------------------------------
class KVSender:
    """Pushes requests' KV blocks to a receiver endpoint (a DEALER socket; one thread uses it)."""

    def __init__(
        self, cache: PagedKVCache, endpoint: str, *, context: zmq.Context | None = None, timeout_s: float = 60.0
    ) -> None:
        """`timeout_s`: the longest a send, or a wait for a staging buffer ZeroMQ still holds, may block
        (then TimeoutError): a dead or stuck receiver fails the transfer instead of hanging the sender."""
        self.cache = cache
        self.timeout_s = timeout_s
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        self.socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live connection: a dead peer fails the send
        # Every frame zero-copy, so the tracker of a message's last frame is real: pyzmq would copy a
        # small one (a short last chunk's slabs) and hand back a tracker that is already done.
        self.socket.copy_threshold = 0
        try:
            self.socket.connect(endpoint)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise
        self._views = SlabViews(cache) if cache.device.type == "cpu" else None
        self._staging: list[tuple[torch.Tensor, zmq.MessageTracker | None]] = []
        self._next = 0
        self.bytes_sent = 0
        self.last_tracker: zmq.MessageTracker | None = None  # released when ZeroMQ is done with the last chunk

    def close(self) -> None:
        self.socket.close(linger=0)  # drops what is queued, which releases the staging buffers

    def can_send_now(self, block_ids: list[int]) -> bool:
        """Whether `send_chunk` for these blocks would go through without waiting: the connection is up
        and under its high-water mark, and a chunk that must be staged has a free staging buffer."""
        if not self.socket.get(zmq.EVENTS) & zmq.POLLOUT:
            return False
        if self._views is not None and consecutive(block_ids):
            return True
        if self._next == len(self._staging):
            return True
        tracker = self._staging[self._next][1]
        return tracker is None or tracker.done

    def _stage(self, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        """A staging buffer ZeroMQ no longer holds (round-robin over STAGING_BUFFERS), viewed as `shape`."""
        numel = 1
        for n in shape:
            numel *= n
        slot = self._next
        self._next = (slot + 1) % STAGING_BUFFERS
        if slot == len(self._staging):
            self._staging.append((torch.empty(0, dtype=self.cache.dtype), None))
        buffer, tracker = self._staging[slot]
        if tracker is not None:
            try:
                tracker.wait(self.timeout_s)  # ZeroMQ may still be reading the previous chunk from it
            except zmq.NotDone:
                raise TimeoutError(f"a staging buffer was not released within {self.timeout_s} s") from None
        if buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=self.cache.dtype, pin_memory=self.cache.device.type == "cuda")
        self._staging[slot] = (buffer, None)
        return slot, buffer[:numel].view(shape)

    def send_chunk(
        self, request_id: str, seq: int, block_ids: list[int], *, layers: tuple[int, int], block_offset: int = 0,
        last: bool, first_token: int | None = None, wait: bool = True,
    ) -> int:  # fmt: skip
        """Send blocks `block_ids` of layers [start, end) as one chunk; returns the payload bytes.
        `wait=False`: raise zmq.Again (nothing sent) instead of waiting for the peer to take more."""
        cache = self.cache
        start, end = layers
        shape = (end - start, 2, cache.num_kv_heads, len(block_ids), cache.block_size, cache.head_dim)
        slot = None
        if self._views is not None and consecutive(block_ids):
            slabs = self._views.slabs(layers, block_ids[0], len(block_ids))  # views of the cache: no copy
        else:
            slot, chunk = self._stage(shape)
            cache.gather(block_ids, layers=slice(start, end), out=chunk)
            if cache.device.type == "cuda":
                torch.cuda.current_stream(cache.device).synchronize()
            slabs = [_as_bytes(chunk[i, kv, h]) for i in range(shape[0]) for kv in range(2) for h in range(shape[2])]
        header = KVChunkHeader(
            request_id=request_id, seq=seq, layer_start=start, layer_end=end, block_offset=block_offset,
            num_blocks=len(block_ids), dtype=dtype_name(cache.dtype), shape=list(shape),
            checksum=checksum(*slabs), last=last, first_token=first_token,
        )  # fmt: skip
        frames = [_header_encoder.encode(header), *slabs]
        try:
            return self._send_frames(frames, slot, sum(slab.nbytes for slab in slabs), 0 if wait else zmq.NOBLOCK)
        except zmq.Again:
            if not wait:
                raise
            raise TimeoutError(f"the receiver took no KV for {self.timeout_s} s") from None

    def _send_frames(self, frames: list, slot: int | None, nbytes: int, flags: int = 0) -> int:
        # Tracked: ZeroMQ reads the frames after this returns (the cache's blocks, or a staging buffer).
        # A multipart message is queued whole or not at all, so Again means nothing was sent.
        tracker = self.socket.send_multipart(frames, flags=flags, copy=False, track=True)
        if slot is not None:
            self._staging[slot] = (self._staging[slot][0], tracker)
        self.last_tracker = tracker
        self.bytes_sent += nbytes
        return nbytes

    def send_request(
        self, request_id: str, block_ids: list[int], *, layers_per_chunk: int = 1, first_token: int | None = None
    ) -> int:
        """Stream every layer of a request's blocks, `layers_per_chunk` layers per message."""
        total, seq = 0, 0
        num_layers = self.cache.num_layers
        for start in range(0, num_layers, layers_per_chunk):
            end = min(start + layers_per_chunk, num_layers)
            last = end == num_layers
            total += self.send_chunk(
                request_id, seq, block_ids, layers=(start, end), last=last, first_token=first_token if last else None
            )
            seq += 1
        return total

    def poll_ack(self) -> KVAck | None:
        """An acknowledgment that has already arrived, or None (never blocks)."""
        try:
            return _ack_decoder.decode(self.socket.recv(zmq.NOBLOCK))
        except zmq.Again:
            return None

    def wait_ack(self, timeout_s: float) -> KVAck:
        if not self.socket.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no KV acknowledgment within {timeout_s} s")
        return _ack_decoder.decode(self.socket.recv())


# -- receiving --------------------------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
FRAME_HEAP_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for it on 64-bit
FRAME_HEAP_TRIM_THRESHOLD = 256 << 20


def keep_frame_memory() -> bool:
    """Stop glibc from returning received frames' memory to the kernel after each frame.

    libzmq mallocs every received frame in its I/O thread and frees it once the frame is copied into
    the cache. With glibc's defaults, a frame above the (adaptive) mmap threshold is mmapped and
    unmapped, and freed space at the top of a heap beyond the trim threshold is handed back with
    madvise, so the next frame faults in fresh zero-filled pages: on a KV receiver that is about one
    page fault in eight pages received. Fixing the mmap threshold at 32 MiB and the trim threshold at
    256 MiB lets the next frame reuse the memory. Process-wide (torch's CPU tensors under 32 MiB come
    from the heap too); a decode peer calls it once at start. Returns False where it does not apply
    (not glibc)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, FRAME_HEAP_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, FRAME_HEAP_TRIM_THRESHOLD)
    )


class Frames(Protocol):
    """The payload frames of one message, read in order (a socket's, or a list's in tests)."""

    def more(self) -> bool: ...
    def read(self) -> memoryview: ...
    def read_into(self, buffer: memoryview) -> int:
        """Copy the next frame into `buffer`; returns the frame's size (more than fits: truncated)."""
        ...

    def drain(self) -> None: ...


class SocketFrames:
    """The rest of a multipart message being received on a socket."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket

    def more(self) -> bool:
        return bool(self.socket.getsockopt(zmq.RCVMORE))

    def read(self) -> memoryview:
        return self.socket.recv(copy=False).buffer

    def read_into(self, buffer: memoryview) -> int:
        return self.socket.recv_into(buffer)  # libzmq copies the frame straight into `buffer`

    def drain(self) -> None:
        while self.more():
            self.socket.recv(copy=False)


class ListFrames:
    def __init__(self, frames: list[memoryview]) -> None:
        self.frames = frames
        self.next = 0

    def more(self) -> bool:
        return self.next < len(self.frames)

    def read(self) -> memoryview:
        self.next += 1
        return memoryview(self.frames[self.next - 1]).cast("B")

    def read_into(self, buffer: memoryview) -> int:
        frame = self.read()
        n = min(frame.nbytes, buffer.nbytes)
        buffer[:n] = frame[:n]
        return frame.nbytes

    def drain(self) -> None:
        self.next = len(self.frames)


@dataclass
class Incoming:
    """A request the receiver has reserved blocks for, and which (layer, block) pairs have arrived."""

    block_ids: list[int]
    covered: np.ndarray  # bool [num_layers, num_blocks]
    next_seq: int = 0
    bytes: int = 0
    sender: bytes | None = None  # the connection whose first chunk was accepted: only it may send more


class KVReceiver:
    """Accepts chunks into reserved blocks of a local cache. `serve_once()` reads one message from a
    ROUTER socket and answers acks; `handle()` takes a message's frames as a list (socket-free, for tests).

    When the chunk's blocks are consecutive ids on a CPU cache, each slab frame is received straight
    into its slice of the cache (`recv_into`: one copy, by libzmq) and hashed there while it is still
    in the CPU cache; otherwise frames are received, checked, and scattered. Nothing is written before
    the header is validated against the request's reservation, so a chunk can only ever write into
    blocks reserved for its request. A chunk that fails afterwards (checksum, frame sizes) may have
    written into those blocks; it ends the request, and the caller frees them.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache
        self.views = SlabViews(cache) if cache.device.type == "cpu" else None
        self.incoming: dict[str, Incoming] = {}
        self.bytes_received = 0
        self.last_ended: str | None = None  # the request the last message ended here (done or failed), if any

    def expect(self, request_id: str, block_ids: list[int]) -> None:
        """Register the blocks reserved for a request before its KV arrives."""
        if request_id in self.incoming:
            raise TransferError(f"request {request_id!r} is already expected")
        covered = np.zeros((self.cache.num_layers, len(block_ids)), dtype=bool)
        self.incoming[request_id] = Incoming(list(block_ids), covered)

    def cancel(self, request_id: str) -> None:
        self.incoming.pop(request_id, None)

    def _expected_shape(self, header: KVChunkHeader) -> list[int]:
        c = self.cache
        return [header.layer_end - header.layer_start, 2, c.num_kv_heads, header.num_blocks, c.block_size, c.head_dim]

    def handle(self, header_frame: bytes | memoryview, slabs: list[memoryview], sender: bytes = b"") -> KVAck | None:
        """Validate and store one chunk given as frames. See `receive`."""
        return self.receive(header_frame, ListFrames(slabs), sender)

    def receive(self, header_frame: bytes | memoryview, frames: Frames, sender: bytes = b"") -> KVAck | None:
        """Validate and store one chunk from connection `sender`, reading its slab frames from `frames`
        (all of them, whatever happens). Returns the ack after the last chunk (or a failed ack); else None.

        A failed chunk ends the request on this side: it is forgotten, and the caller frees its blocks;
        `last_ended` names it. A chunk that is no request's business here (not expected: never, or no
        longer; or from another connection than the one sending that request's KV) is refused with an
        ack and changes nothing.
        """
        self.last_ended = None
        try:
            header = _header_decoder.decode(header_frame)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            frames.drain()
            return KVAck(request_id="", ok=False, chunks=0, bytes=0, error=f"bad chunk header: {exc}")
        rid = header.request_id
        state = self.incoming.get(rid)
        if state is None:
            frames.drain()
            return KVAck(request_id=rid, ok=False, chunks=0, bytes=0, error=f"request {rid!r} is not expected here")
        if state.sender is not None and sender != state.sender:
            frames.drain()
            return KVAck(request_id=rid, ok=False, chunks=0, bytes=0,
                         error=f"request {rid!r} is being sent by another connection")  # fmt: skip
        try:
            self._check_header(header, state)
            nbytes = self._store(header, state, frames)
        except TransferError as exc:
            frames.drain()
            del self.incoming[rid]
            self.last_ended = rid
            return KVAck(request_id=rid, ok=False, chunks=header.seq, bytes=state.bytes, error=str(exc))
        state.sender = sender
        state.next_seq += 1
        state.bytes += nbytes
        offset = header.block_offset
        state.covered[header.layer_start : header.layer_end, offset : offset + header.num_blocks] = True
        self.bytes_received += nbytes
        if not header.last:
            return None
        del self.incoming[rid]
        self.last_ended = rid
        if not state.covered.all():
            layers, blocks = np.nonzero(~state.covered)
            return KVAck(request_id=rid, ok=False, chunks=state.next_seq, bytes=state.bytes,
                         error=f"last chunk arrived but {layers.size} (layer, block) pairs are missing, "
                               f"from layer {layers[0]} block {blocks[0]}")  # fmt: skip
        return KVAck(request_id=rid, ok=True, chunks=state.next_seq, bytes=state.bytes, first_token=header.first_token)

    def _store(self, header: KVChunkHeader, state: Incoming, frames: Frames) -> int:
        """Read the slab frames into the request's blocks, checking count, sizes and checksum."""
        cache = self.cache
        blocks = state.block_ids[header.block_offset : header.block_offset + header.num_blocks]
        shape = header.shape
        num_slabs = shape[0] * 2 * shape[2]
        slab_bytes = cache.kv.element_size() * shape[3] * shape[4] * shape[5]
        digest = xxhash.xxh3_64()
        views = self.views
        # On a CPU cache, each run of consecutive reserved blocks has its own slice of every slab row.
        block_runs = runs(blocks) if views is not None else []
        layers = (header.layer_start, header.layer_end)
        targets = [views.slabs(layers, first, length) for first, length, _ in block_runs] if views else []
        received: list[memoryview] = []  # a GPU cache: scattered after the checksum
        for i in range(num_slabs):
            if not frames.more():
                raise TransferError(f"chunk has {i} slab frames, its shape implies {num_slabs}")
            if len(targets) == 1:  # consecutive blocks: received straight into the cache
                slab = targets[0][i]
                size = frames.read_into(slab)
            else:
                slab = frames.read()
                size = slab.nbytes
            if size != slab_bytes:
                raise TransferError(f"chunk slab has {size} bytes, its shape implies {slab_bytes}")
            if len(targets) > 1:
                width = views.block_bytes
                for (_, length, position), run_targets in zip(block_runs, targets, strict=True):
                    run_targets[i][:] = slab[position * width : (position + length) * width]
            elif not targets:
                received.append(slab)
            digest.update(slab)  # just written or received: still in the CPU cache
        if frames.more():
            raise TransferError(f"chunk has more than the {num_slabs} slab frames its shape implies")
        if digest.intdigest() != header.checksum:
            raise TransferError("chunk checksum mismatch: the payload was corrupted")
        if received:
            data = torch.stack([torch.frombuffer(slab, dtype=cache.dtype) for slab in received]).view(shape)
            cache.scatter(blocks, data, layers=slice(header.layer_start, header.layer_end))
        return num_slabs * slab_bytes

    def _check_header(self, header: KVChunkHeader, state: Incoming) -> None:
        cache = self.cache
        if header.v != TRANSFER_VERSION:
            raise TransferError(f"transfer version {header.v} is not supported (this peer speaks {TRANSFER_VERSION})")
        if header.seq != state.next_seq:
            raise TransferError(f"chunk seq {header.seq} arrived, expected {state.next_seq}")
        if header.dtype != dtype_name(cache.dtype):
            raise TransferError(f"chunk dtype {header.dtype} does not match this cache's {dtype_name(cache.dtype)}")
        if not 0 <= header.layer_start < header.layer_end <= cache.num_layers:
            raise TransferError(
                f"chunk layers [{header.layer_start}, {header.layer_end}) outside 0..{cache.num_layers}"
            )
        if (
            header.num_blocks < 1
            or header.block_offset < 0
            or header.block_offset + header.num_blocks > len(state.block_ids)
        ):
            raise TransferError(
                f"chunk blocks [{header.block_offset}, {header.block_offset + header.num_blocks}) exceed the "
                f"{len(state.block_ids)} blocks reserved"
            )
        expected = self._expected_shape(header)
        if header.shape != expected:
            raise TransferError(f"chunk shape {header.shape} does not match this cache's layout {expected}")

    def serve_once(self, socket: zmq.Socket, timeout_ms: int = -1) -> KVAck | None:
        """Receive one message on a ROUTER socket, store it, and send the ack (if any) back."""
        self.last_ended = None
        if timeout_ms >= 0 and not socket.poll(timeout_ms):
            return None
        identity = socket.recv()
        frames = SocketFrames(socket)
        if not frames.more():
            ack = KVAck(request_id="", ok=False, chunks=0, bytes=0, error="expected header + slabs, got 0 frames")
        else:
            header = socket.recv()
            if not frames.more():
                ack = KVAck(request_id="", ok=False, chunks=0, bytes=0, error="expected header + slabs, got 1 frame")
            else:
                ack = self.receive(header, frames, identity)
        if ack is not None:
            socket.send_multipart([identity, _header_encoder.encode(ack)])
        return ack
