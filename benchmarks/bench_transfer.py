"""KV push throughput, prefill -> decode over tcp loopback, vs raw pyzmq PUSH/PULL of the same bytes.

    python benchmarks/bench_transfer.py [--json] [--requests 8] [--rounds 3]

For each case, a 2,048-token request's KV (block size 16) is pushed layer by
layer (one message per layer) from a sender process's PagedKVCache to a
receiver process, which validates each chunk (header, shape, xxh3 checksum)
and scatters it into reserved blocks, then acknowledges the request. Baseline:
raw PUSH/PULL between two processes sending the same number of messages of the
same size, `copy=False` from a preallocated buffer, the receiver only counting
them. Throughput = bytes / (first send -> last acknowledgment); rounds
alternate ours and raw, medians reported. `transfer_ratio_vs_raw_zmq` is the
median over cases of ours / raw.

Not measured yet: TTFT of a --prefill 1 --decode 1 cluster vs the unified
daemon (the prefill/decode roles do not exist yet).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

import torch
import zmq
from report import emit  # benchmarks/report.py (the script's folder is on sys.path)

from dcpd.disagg.transfer import KVReceiver, KVSender
from dcpd.kv.cache import PagedKVCache

TOKENS, BLOCK = 2048, 16
CASES = {
    "8L_8kvh_d64_fp32": (8, 8, 64, torch.float32),
    "32L_8kvh_d128_bf16": (32, 8, 128, torch.bfloat16),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cache(case: str, blocks: int) -> PagedKVCache:
    layers, heads, dim, dtype = CASES[case]
    return PagedKVCache(layers, blocks, BLOCK, heads, dim, dtype=dtype)


def receiver_main(case: str, port: int, requests: int, ready: mp.Event) -> None:
    cache = make_cache(case, TOKENS // BLOCK + 1)
    blocks = cache.pool.allocate(TOKENS // BLOCK)
    receiver = KVReceiver(cache)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    ready.set()
    for i in range(requests):
        receiver.expect(f"r{i}", blocks)  # the same reserved blocks, overwritten by each request
        while True:
            ack = receiver.serve_once(router)
            if ack is not None:
                assert ack.ok, ack.error
                break
    time.sleep(0.5)  # let the last ack leave
    router.close(linger=1000)
    ctx.term()


def raw_receiver_main(port: int, back_port: int, messages: int, ready: mp.Event) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    done = ctx.socket(zmq.PUSH)
    done.connect(f"tcp://127.0.0.1:{back_port}")
    ready.set()
    received = 0
    for _ in range(messages):
        received += len(pull.recv(copy=False).buffer)
    done.send(str(received).encode())
    done.close(linger=1000)
    pull.close(linger=0)
    ctx.term()


def ours(case: str, requests: int) -> tuple[float, int]:
    port = free_port()
    ready = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=receiver_main, args=(case, port, requests, ready))
    proc.start()
    ready.wait(60)
    cache = make_cache(case, TOKENS // BLOCK + 1)
    cache.kv.normal_()
    blocks = cache.pool.allocate(TOKENS // BLOCK)
    ctx = zmq.Context()
    sender = KVSender(cache, f"tcp://127.0.0.1:{port}", context=ctx)
    start = time.perf_counter()
    total = sum(sender.send_request(f"r{i}", blocks) for i in range(requests))
    for _ in range(requests):
        ack = sender.wait_ack(120)
        assert ack.ok, ack.error
    elapsed = time.perf_counter() - start
    sender.close()
    ctx.term()
    proc.join(30)
    return elapsed, total


def raw(case: str, requests: int) -> tuple[float, int]:
    layers, heads, dim, dtype = CASES[case]
    message = torch.zeros(2 * heads * TOKENS * dim, dtype=dtype)
    payload = memoryview(message.view(torch.uint8).numpy()).cast("B")
    count = requests * layers
    port, back_port = free_port(), free_port()
    ctx = zmq.Context()
    back = ctx.socket(zmq.PULL)
    back.bind(f"tcp://127.0.0.1:{back_port}")
    ready = mp.get_context("spawn").Event()
    proc = mp.get_context("spawn").Process(target=raw_receiver_main, args=(port, back_port, count, ready))
    proc.start()
    ready.wait(60)
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    start = time.perf_counter()
    for _ in range(count):
        push.send(payload, copy=False)
    received = int(back.recv())
    elapsed = time.perf_counter() - start
    push.close(linger=0)
    back.close(linger=0)
    ctx.term()
    proc.join(30)
    return elapsed, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result: dict[str, object] = {"tokens": TOKENS, "requests": args.requests, "rounds": args.rounds,
                                 "torch_threads": torch.get_num_threads()}  # fmt: skip
    ratios = []
    for case, (layers, heads, dim, dtype) in CASES.items():
        ours_gbs, raw_gbs = [], []
        for _ in range(args.rounds):
            seconds, nbytes = ours(case, args.requests)
            ours_gbs.append(nbytes / seconds / 1e9)
            seconds, nbytes = raw(case, args.requests)
            raw_gbs.append(nbytes / seconds / 1e9)
        ours_med, raw_med = statistics.median(ours_gbs), statistics.median(raw_gbs)
        ratios.append(ours_med / raw_med)
        result[case] = {
            "message_mib": 2 * heads * TOKENS * dim * dtype.itemsize / 2**20,
            "request_mib": layers * 2 * heads * TOKENS * dim * dtype.itemsize / 2**20,
            "dcpd_gb_s": ours_med,
            "raw_zmq_gb_s": raw_med,
            "ratio": ours_med / raw_med,
        }
    result["transfer_ratio_vs_raw_zmq"] = statistics.median(ratios)
    emit(result, args.json)


if __name__ == "__main__":
    main()
