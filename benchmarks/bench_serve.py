"""Load generator against a real daemon, and the same workload through the offline engine.

    python benchmarks/bench_serve.py [--json] [--requests 64] [--clients 16] [--rate 50]

Starts `dcpd serve` as a subprocess on an ipc endpoint with a random Llama
checkpoint (hidden 512, 4 layers, vocab 8000: about 15M parameters, fp32), then
sends `--requests` greedy requests (prompts of 32..256 tokens, 64 new tokens,
EOS ignored) from `--clients` concurrent DEALER clients with Poisson arrivals
at `--rate` requests/s, streaming. Reports throughput (generated tokens / wall
time from the first send to the last reply), TTFT and TPOT p50/p99. The same
requests go through `LLMEngine.generate` in this process on the same weights;
`ratio_vs_offline` = daemon tokens/s / offline tokens/s. Both use torch's
default thread count. The daemon stays up (idle) while the offline runs go;
`--rounds` alternates offline and served runs and reports medians, so both
see the same machine noise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import zmq.asyncio
from report import emit  # benchmarks/report.py (the script's folder is on sys.path)
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from dcpd.client import AsyncClient
from dcpd.engine import LLMEngine, SamplingParams
from dcpd.model.loader import load_model_dir

NEW_TOKENS = 64


def build_checkpoint(path: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)  # fmt: skip
    HFLlama(config).float().save_pretrained(path, safe_serialization=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_daemon(model: str, tmp: str) -> tuple[subprocess.Popen, str]:
    endpoint = f"ipc://{tmp}/f"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"{tmp}/n")
    notify.settimeout(300)
    args = [sys.executable, "-m", "dcpd.cli", "serve", "--model", model, "--frontend", endpoint,
            "--set", "metrics.enabled=false", "--set", "logging.level=warning"]  # fmt: skip
    log = open(f"{tmp}/log", "w")  # lives as long as the daemon
    proc = subprocess.Popen(args, env={**os.environ, "NOTIFY_SOCKET": f"{tmp}/n"}, stdout=log, stderr=log)
    while b"READY=1" not in notify.recv(4096):
        pass
    notify.close()
    return proc, endpoint


async def load(endpoint: str, prompts: list[list[int]], clients: int, rate: float) -> dict[str, object]:
    rng = random.Random(1)
    context = zmq.asyncio.Context()  # one I/O thread for all the client sockets
    sockets = [AsyncClient(endpoint, timeout=600, context=context) for _ in range(clients)]
    ttft: list[float] = []
    tpot: list[float] = []
    outputs: list[list[int]] = [[] for _ in prompts]

    async def one(index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        stream = await sockets[index % clients].generate(
            prompt_ids=prompts[index], max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True
        )
        first = None
        async for _chunk in stream:
            if first is None:
                first = time.perf_counter()
        done = time.perf_counter()
        outputs[index] = stream.result.token_ids
        ttft.append(first - sent)
        tpot.append((done - first) / (NEW_TOKENS - 1))

    arrivals, t = [], 0.0
    for _ in prompts:
        arrivals.append(t)
        t += rng.expovariate(rate)
    start = time.perf_counter()
    await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
    wall = time.perf_counter() - start
    for client in sockets:
        await client.close()
    context.term()
    return {"wall_s": wall, "ttft": ttft, "tpot": tpot, "outputs": outputs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rate", type=float, default=100.0, help="Poisson arrival rate, requests/s")
    parser.add_argument("--rounds", type=int, default=3, help="alternating offline / served runs (medians)")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 8000) for _ in range(rng.randint(32, 256))] for _ in range(args.requests)]
    generated = args.requests * NEW_TOKENS
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    offline_runs: list[float] = []
    served_runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dcpdb", dir="/tmp") as tmp:
        model = f"{tmp}/model"
        build_checkpoint(model)
        loaded = load_model_dir(model)
        proc, endpoint = start_daemon(model, tmp)
        try:
            asyncio.run(load(endpoint, prompts[:2], 1, 1000.0))  # warm-up
            LLMEngine(loaded).generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
            for _ in range(args.rounds):
                engine = LLMEngine(loaded)
                start = time.perf_counter()
                offline = engine.generate(prompts, params)
                offline_runs.append(time.perf_counter() - start)
                del engine
                served_runs.append(asyncio.run(load(endpoint, prompts, args.clients, args.rate)))
        finally:
            proc.terminate()
            proc.wait(60)
    offline_s = statistics.median(offline_runs)
    served = sorted(served_runs, key=lambda r: r["wall_s"])[len(served_runs) // 2]  # the median run
    same = sum(a == r.token_ids for a, r in zip(served["outputs"], offline, strict=True))
    daemon_tps = generated / served["wall_s"]
    offline_tps = generated / offline_s
    result = {
        "requests": args.requests,
        "clients": args.clients,
        "rate_rps": args.rate,
        "new_tokens": NEW_TOKENS,
        "threads": torch.get_num_threads(),
        "daemon_tok_s": daemon_tps,
        "offline_tok_s": offline_tps,
        "ratio_vs_offline": daemon_tps / offline_tps,
        "ttft_p50_ms": percentile(served["ttft"], 50) * 1e3,
        "ttft_p99_ms": percentile(served["ttft"], 99) * 1e3,
        "tpot_p50_ms": percentile(served["tpot"], 50) * 1e3,
        "tpot_p99_ms": percentile(served["tpot"], 99) * 1e3,
        "mean_tpot_ms": statistics.mean(served["tpot"]) * 1e3,
        "rounds": args.rounds,
        "outputs_identical_to_offline": f"{same}/{args.requests}",
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
