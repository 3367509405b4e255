"""KV push throughput, prefill -> decode over tcp loopback, vs raw pyzmq PUSH/PULL of the same bytes.

    python benchmarks/bench_transfer.py [--json] [--requests 8] [--rounds 3]

For each case, a 2,048-token request's KV (block size 16) is pushed layer by
layer (one message per layer) from a sender process's PagedKVCache to a
receiver process, which validates each chunk (header, shape, xxh3 checksum),
lands it in reserved blocks, then acknowledges the request; the receiver binds
its socket and sets its allocator as a decode peer does (`bind_kv_socket`,
`keep_frame_memory`; the raw receivers get the same allocator setting). Baseline: raw
PUSH/PULL between two processes sending the same number of messages of the
same size, `copy=False` from a preallocated buffer, the receiver only counting
them. A second reference, "into pool": raw PUSH/PULL of the request's own slab
frames, each received (`recv_into`) into its slice of the receiver's blocks,
with no header, check or checksum: the least work any ZeroMQ receiver that
puts the bytes where attention reads them must do. Throughput = bytes / (first
send -> last acknowledgment or count); rounds cycle ours, raw, into pool;
medians reported. `transfer_ratio_vs_raw_zmq` is the median over cases of
ours / raw; `into_pool_ratio_vs_raw_zmq` the same for the second reference.

TTFT: a random Llama checkpoint with the KV shape of the first case (8 layers,
8 KV heads, head dim 64; hidden 512, vocab 8000, fp32) is served by a unified
daemon and by `dcpd cluster --prefill 1 --decode 1` (ipc endpoints), every
daemon with `engine.threads = --threads` (default 2: this machine's cores).
TTFT = client-side time from sending a streamed Generate of a fresh random
2,048-token prompt to its first token chunk; `--ttft-requests` sequential
requests per round, `--rounds` rounds alternating unified and cluster,
medians. `ttft_ratio_disagg_vs_unified` = cluster median / unified median.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from multiprocessing.sharedctypes import Synchronized

import torch
import zmq
from report import emit  # benchmarks/report.py (the script's folder is on sys.path)

from dcpd.client import AsyncClient
from dcpd.disagg.ingest import bind_kv_socket
from dcpd.disagg.transfer import KVReceiver, KVSender, SlabViews, keep_frame_memory
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


class RawLink:
    """A PUSH socket to a receiver process `target(*args, port, back_port, count, ready, cpu)`, which
    reports the bytes it received on a PULL socket here once it has `count` of its units."""

    def __init__(self, target: Callable[..., None], args: tuple, count: int) -> None:
        port, back_port = free_port(), free_port()
        self.ctx = zmq.Context()
        self.back = self.ctx.socket(zmq.PULL)
        self.back.bind(f"tcp://127.0.0.1:{back_port}")
        spawn = mp.get_context("spawn")
        ready, self.cpu = spawn.Event(), spawn.Value("d", 0.0)
        self.proc = spawn.Process(target=target, args=(*args, port, back_port, count, ready, self.cpu))
        self.proc.start()
        ready.wait(60)
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.connect(f"tcp://127.0.0.1:{port}")

    def received(self) -> int:
        """Wait for the receiver's count of bytes."""
        return int(self.back.recv())

    def close(self) -> float:
        """Close everything; returns the receiver's CPU seconds."""
        self.push.close(linger=0)
        self.back.close(linger=0)
        self.ctx.term()
        self.proc.join(30)
        return self.cpu.value


def receiver_main(case: str, port: int, requests: int, ready: mp.Event, cpu: Synchronized) -> None:
    keep_frame_memory()  # as a decode peer does at start
    cache = make_cache(case, TOKENS // BLOCK + 1)
    blocks = cache.pool.allocate(TOKENS // BLOCK)
    receiver = KVReceiver(cache)
    ctx = zmq.Context()
    router = bind_kv_socket(ctx, cache, f"tcp://127.0.0.1:{port}")  # the decode peer's socket options
    ready.set()
    start = time.process_time()  # this process's CPU, its ZeroMQ I/O thread included
    for i in range(requests):
        receiver.expect(f"r{i}", blocks)  # the same reserved blocks, overwritten by each request
        while True:
            ack = receiver.serve_once(router)
            if ack is not None:
                assert ack.ok, ack.error
                break
    cpu.value = time.process_time() - start
    time.sleep(0.5)  # let the last ack leave
    router.close(linger=1000)
    ctx.term()


def raw_receiver_main(
    case: str, into_pool: bool, port: int, back_port: int, requests: int, ready: mp.Event, cpu: Synchronized
) -> None:
    keep_frame_memory()  # the same allocator settings as dcpd's receiver
    layers = CASES[case][0]
    views = SlabViews(make_cache(case, TOKENS // BLOCK + 1)) if into_pool else None
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    done = ctx.socket(zmq.PUSH)
    done.connect(f"tcp://127.0.0.1:{back_port}")
    ready.set()
    start = time.process_time()
    received = 0
    for i in range(requests * layers):
        if views is None:
            received += len(pull.recv(copy=False).buffer)
        else:  # each slab frame lands in its slice of the blocks: the least a KV receiver must do
            for target in views.slabs((i % layers, i % layers + 1), 0, TOKENS // BLOCK):
                received += pull.recv_into(target)
    cpu.value = time.process_time() - start
    done.send(str(received).encode())
    done.close(linger=1000)
    pull.close(linger=0)
    ctx.term()


def ours(case: str, requests: int) -> tuple[float, int, float]:
    """(seconds, bytes, CPU seconds of both processes)."""
    port = free_port()
    ready, cpu = mp.get_context("spawn").Event(), mp.get_context("spawn").Value("d", 0.0)
    proc = mp.get_context("spawn").Process(target=receiver_main, args=(case, port, requests, ready, cpu))
    proc.start()
    ready.wait(60)
    cache = make_cache(case, TOKENS // BLOCK + 1)
    cache.kv.normal_()
    blocks = cache.pool.allocate(TOKENS // BLOCK)
    ctx = zmq.Context()
    sender = KVSender(cache, f"tcp://127.0.0.1:{port}", context=ctx)
    start, start_cpu = time.perf_counter(), time.process_time()
    total = sum(sender.send_request(f"r{i}", blocks) for i in range(requests))
    for _ in range(requests):
        ack = sender.wait_ack(120)
        assert ack.ok, ack.error
    elapsed, sender_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    sender.close()
    ctx.term()
    proc.join(30)
    return elapsed, total, sender_cpu + cpu.value


def raw(case: str, requests: int, *, into_pool: bool = False) -> tuple[float, int, float]:
    """Raw PUSH/PULL of the same bytes in the same message sizes. Plain: one frame per message from a
    preallocated buffer, the receiver only counting. `into_pool`: the request's own slab frames from
    a cache, each received (`recv_into`) into its slice of a receiving cache's blocks; no header,
    check or checksum."""
    layers, heads, dim, dtype = CASES[case]
    if into_pool:
        cache = make_cache(case, TOKENS // BLOCK + 1)
        cache.kv.normal_()
        views = SlabViews(cache)
    else:
        message = torch.zeros(2 * heads * TOKENS * dim, dtype=dtype)
        payload = memoryview(message.view(torch.uint8).numpy()).cast("B")
    link = RawLink(raw_receiver_main, (case, into_pool), requests)
    push = link.push
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        for layer in range(layers):
            if into_pool:
                push.send_multipart(views.slabs((layer, layer + 1), 0, TOKENS // BLOCK), copy=False)
            else:
                push.send(payload, copy=False)
    received = link.received()
    elapsed, sender_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return elapsed, received, sender_cpu + link.close()


def build_checkpoint(path: str) -> None:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)  # fmt: skip
    HFLlama(config).float().save_pretrained(path, safe_serialization=True)


def start_unified(model: str, tmp: str, threads: int) -> tuple[subprocess.Popen, str]:
    endpoint = f"ipc://{tmp}/u"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{tmp}/n")
    notify.settimeout(300)
    args = [
        sys.executable,
        "-m",
        "dcpd.cli",
        "serve",
        "--model",
        model,
        "--frontend",
        endpoint,
        "--set",
        "metrics.enabled=false",
        "--set",
        'logging.level="warning"',
        "--set",
        f"engine.threads={threads}",
    ]
    log = open(f"{tmp}/unified.log", "w")
    proc = subprocess.Popen(args, env={**os.environ, "NOTIFY_SOCKET": f"{tmp}/n"}, stdout=log, stderr=log)
    while b"READY=1" not in notify.recv(4096):
        pass
    notify.close()
    os.unlink(f"{tmp}/n")
    return proc, endpoint


def start_cluster(model: str, tmp: str, threads: int, sets: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`sets`: more `--set KEY=VALUE` items for every daemon of the cluster."""
    endpoint = f"ipc://{tmp}/c"
    args = [sys.executable, "-m", "dcpd.cli", "cluster", "--model", model, "--prefill", "1", "--decode", "1",
            "--frontend", endpoint, "--set", "metrics.enabled=false", "--set", "logging.level=\"warning\"",
            "--set", f"engine.threads={threads}"]  # fmt: skip
    for item in sets:
        args += ["--set", item]
    out = open(f"{tmp}/cluster.out", "w")
    err = open(f"{tmp}/cluster.log", "w")
    proc = subprocess.Popen(args, stdout=out, stderr=err)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with open(f"{tmp}/cluster.out") as f:
            if any(json.loads(line).get("event") == "cluster ready" for line in f if line.strip()):
                return proc, endpoint
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError("cluster not ready")


async def measure_ttft(endpoint: str, requests: int, prompt_tokens: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    ttfts = []
    async with AsyncClient(endpoint, timeout=300) as client:
        for _ in range(requests):
            prompt = [rng.randrange(8000) for _ in range(prompt_tokens)]
            start = time.perf_counter()
            stream = await client.generate(prompt_ids=prompt, max_tokens=2, temperature=0.0, ignore_eos=True)
            async for _ in stream:
                ttfts.append(time.perf_counter() - start)
                break
            await stream.collect()
    return ttfts


def ttft(rounds: int, requests: int, threads: int) -> dict[str, object]:
    unified, disagg = [], []
    with tempfile.TemporaryDirectory(prefix="dcpt", dir="/tmp") as tmp:
        model = f"{tmp}/model"
        build_checkpoint(model)
        for r in range(rounds):
            for start, out in ((start_unified, unified), (start_cluster, disagg)):
                proc, endpoint = start(model, tmp, threads)
                try:
                    asyncio.run(measure_ttft(endpoint, 1, TOKENS, seed=999))  # warm-up
                    out += asyncio.run(measure_ttft(endpoint, requests, TOKENS, seed=r))
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(120)
    u, d = statistics.median(unified), statistics.median(disagg)
    return {"ttft_threads_per_daemon": threads, "ttft_prompt_tokens": TOKENS, "ttft_unified_ms": u * 1e3,
            "ttft_disagg_1p1d_ms": d * 1e3, "ttft_ratio_disagg_vs_unified": d / u}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ttft-requests", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every daemon (TTFT)")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--skip-transfer", action="store_true")
    args = parser.parse_args()
    result: dict[str, object] = {"tokens": TOKENS, "requests": args.requests, "rounds": args.rounds,
                                 "torch_threads": torch.get_num_threads()}  # fmt: skip
    ratios: list[float] = []
    ceilings: list[float] = []
    for case, (layers, heads, dim, dtype) in CASES.items() if not args.skip_transfer else ():
        ours_gbs, raw_gbs, into_gbs = [], [], []
        cpu: dict[str, list[float]] = {"dcpd": [], "raw_zmq": [], "raw_zmq_into_pool": []}
        for _ in range(args.rounds):
            runs = ((ours_gbs, ours, "dcpd"), (raw_gbs, raw, "raw_zmq"),
                    (into_gbs, partial(raw, into_pool=True), "raw_zmq_into_pool"))  # fmt: skip
            for out, run, name in runs:
                seconds, nbytes, cpu_seconds = run(case, args.requests)
                out.append(nbytes / seconds / 1e9)
                cpu[name].append(cpu_seconds / (nbytes / 1e9))
        ours_med, raw_med, into_med = (statistics.median(x) for x in (ours_gbs, raw_gbs, into_gbs))
        ratios.append(ours_med / raw_med)
        ceilings.append(into_med / raw_med)
        result[case] = {
            "message_mib": 2 * heads * TOKENS * dim * dtype.itemsize / 2**20,
            "request_mib": layers * 2 * heads * TOKENS * dim * dtype.itemsize / 2**20,
            "dcpd_gb_s": ours_med,
            "raw_zmq_gb_s": raw_med,
            "raw_zmq_into_pool_gb_s": into_med,
            "ratio": ours_med / raw_med,
            "ratio_vs_into_pool": ours_med / into_med,
            **{f"{name}_cpu_s_per_gb": statistics.median(values) for name, values in cpu.items()},
        }
    if ratios:
        result["transfer_ratio_vs_raw_zmq"] = statistics.median(ratios)
        result["into_pool_ratio_vs_raw_zmq"] = statistics.median(ceilings)
    if not args.skip_ttft:
        result.update(ttft(args.rounds, args.ttft_requests, args.threads))
    emit(result, args.json)


if __name__ == "__main__":
    main()
