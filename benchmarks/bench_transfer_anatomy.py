"""Where the KV push's time goes: the receive pipeline with one cost added at a time, vs raw ZeroMQ.

    python benchmarks/bench_transfer_anatomy.py [--json] [--messages 512] [--rounds 4]

Every variant moves the same bytes over tcp loopback between two processes, in
8 MiB messages (one layer of the 8-layer, 8-KV-head, head-dim-64 fp32 case of
`bench_transfer.py`) read round-robin from a 64 MiB source (as a prefill
peer's cache is, not one hot buffer), a small header frame first, with the
decode peer's allocator setting (`keep_frame_memory`) on the receiver:

- `raw`: one frame per message; the receiver only counts it (`recv(copy=False)`).
- `into_pool_1`, `into_pool_16`: the payload as 1 frame or as 16 (one per K/V
  and head: dcpd's head-major slabs), each received with `recv_into` into its
  slice of a 64 MiB pool: the copy that landing KV where attention reads it costs.
- `checksum_1`, `checksum_16`: the same plus dcpd's xxh3-64, over the source
  on the sender and over the landed bytes on the receiver.

dcpd's own push (`bench_transfer.py`) does the work of `checksum_16` plus its
header checks and bookkeeping. Throughput = bytes / (first send -> receiver
done); rounds cycle the variants; medians, and each variant's ratio to `raw`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from multiprocessing.sharedctypes import Synchronized

import torch
import xxhash
import zmq
from bench_transfer import RawLink
from report import emit  # benchmarks/report.py (the script's folder is on sys.path)

from dcpd.disagg.transfer import keep_frame_memory

MESSAGE, SOURCE_MESSAGES = 8 << 20, 8  # 8 MiB per message, a 64 MiB source and pool
VARIANTS = {  # name: (frames per message, lands in a pool, checksummed)
    "raw": (1, False, False),
    "into_pool_1": (1, True, False),
    "into_pool_16": (16, True, False),
    "checksum_1": (1, True, True),
    "checksum_16": (16, True, True),
}


def receiver_main(variant: str, port: int, back_port: int, messages: int, ready: mp.Event, cpu: Synchronized) -> None:
    keep_frame_memory()
    frames, into_pool, checksummed = VARIANTS[variant]
    pool = memoryview(torch.zeros(SOURCE_MESSAGES * MESSAGE, dtype=torch.uint8).numpy())
    size = MESSAGE // frames
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 0)  # as a decode peer's KV socket
    pull.bind(f"tcp://127.0.0.1:{port}")
    done = ctx.socket(zmq.PUSH)
    done.connect(f"tcp://127.0.0.1:{back_port}")
    ready.set()
    start, received = time.process_time(), 0
    for i in range(messages):
        expected = int(pull.recv())  # the header: here, only the checksum
        digest = xxhash.xxh3_64()
        base = (i % SOURCE_MESSAGES) * MESSAGE
        for j in range(frames):
            if into_pool:
                target = pool[base + j * size : base + (j + 1) * size]
                received += pull.recv_into(target)
                if checksummed:
                    digest.update(target)
            else:
                received += len(pull.recv(copy=False).buffer)
        assert not checksummed or digest.intdigest() == expected, "checksum mismatch"
    cpu.value = time.process_time() - start
    done.send(str(received).encode())
    done.close(linger=1000)
    pull.close(linger=0)
    ctx.term()


def run(variant: str, messages: int) -> tuple[float, float]:
    """(GB/s, CPU seconds of both processes per GB)."""
    frames, _, checksummed = VARIANTS[variant]
    source = memoryview(torch.randn(SOURCE_MESSAGES * MESSAGE // 4).view(torch.uint8).numpy())
    size = MESSAGE // frames
    link = RawLink(receiver_main, (variant,), messages)
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(messages):
        base = (i % SOURCE_MESSAGES) * MESSAGE
        payload = [source[base + j * size : base + (j + 1) * size] for j in range(frames)]
        digest = xxhash.xxh3_64()
        if checksummed:
            for frame in payload:
                digest.update(frame)
        link.push.send_multipart([str(digest.intdigest()).encode(), *payload], copy=False, track=True)
    received = link.received()
    elapsed, sender_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    gigabytes = received / 1e9
    return gigabytes / elapsed, (sender_cpu + link.close()) / gigabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--messages", type=int, default=512, help="8 MiB messages per run")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    speeds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpus: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            gb_s, cpu_per_gb = run(name, args.messages)
            speeds[name].append(gb_s)
            cpus[name].append(cpu_per_gb)
    raw = statistics.median(speeds["raw"])
    result: dict[str, object] = {"messages": args.messages, "message_mib": MESSAGE >> 20, "rounds": args.rounds}
    for name in VARIANTS:
        result[f"{name}_gb_s"] = statistics.median(speeds[name])
        result[f"{name}_cpu_s_per_gb"] = statistics.median(cpus[name])
        result[f"{name}_ratio_vs_raw"] = statistics.median(speeds[name]) / raw
    emit(result, args.json)


if __name__ == "__main__":
    main()
