"""`dcpd cluster` end to end: real router, prefill and decode processes; KV crosses real sockets.

Greedy outputs for many concurrent requests must equal the offline engine's, token for token,
including prompts long enough for chunked prefill (several KV messages per request), and every
peer's block pool must be fully free afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from dcpd.client import AsyncClient, Client
from dcpd.engine import LLMEngine, SamplingParams
from dcpd.model.default import build_default_model

CHILD_SETTINGS = ["engine.max_tokens_per_batch=128", "disagg.heartbeat_interval_s=0.2", "disagg.peer_timeout_s=2.0",
                  'logging.format="json"']  # fmt: skip
PROMPT_LENGTHS = (1, 15, 16, 17, 100, 250, 600, 900, 40, 333, 128, 7)
MAX_TOKENS = 24


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(256) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in LLMEngine(build_default_model()).generate(prompts(), params)]


class ClusterProcess:
    def __init__(self, prefill: int, decode: int, *settings: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix="dcc", dir="/tmp")
        self.frontend = f"ipc://{self.tmp}/f"
        args = [sys.executable, "-m", "dcpd.cli", "cluster", "--prefill", str(prefill), "--decode", str(decode),
                "--frontend", self.frontend]  # fmt: skip
        for item in [*CHILD_SETTINGS, *settings]:
            args += ["--set", item]
        self.out = open(f"{self.tmp}/out", "w+")
        self.err = open(f"{self.tmp}/err", "w+")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=self.err)
        self.final_log: str | None = None
        try:
            self.ready = self._wait_ready(180)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.out.name) as f:
                for line in f:
                    if '"cluster ready"' in line:
                        return json.loads(line)
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}: {self.log()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready in {timeout} s: {self.log()[-3000:]}")

    def log(self) -> str:
        if self.final_log is not None:
            return self.final_log
        with open(self.err.name, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.final_log = self.log()
            self.out.close()
            self.err.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


def wait_pools_free(client: Client, timeout: float = 15.0) -> dict:
    """Every peer's pool (as its latest heartbeat reports it) is fully free."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        peers = {k.rsplit(".", 1)[0] for k in stats if k.startswith("peer.")}
        if stats["inflight"] == 0 and all(
            stats[f"{peer}.kv_blocks_free"] == stats[f"{peer}.kv_blocks_total"] for peer in peers
        ):
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still in use: {stats}")
        time.sleep(0.1)


async def generate_all(frontend: str, stream: bool) -> list[list[int]]:
    async with AsyncClient(frontend, timeout=120) as client:

        async def one(prompt: list[int]) -> list[int]:
            s = await client.generate(prompt_ids=prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                      stream=stream)  # fmt: skip
            streamed = [t for chunk in [c async for c in s] for t in chunk.token_ids] if stream else None
            result = await s.collect()
            assert result.finish_reason == "length"
            if stream:
                assert streamed == result.token_ids
            return result.token_ids

        return list(await asyncio.gather(*(one(p) for p in prompts())))


LOCAL_PREFILL = "disagg.local_prefill_max_tokens=64"  # conditional disaggregation: short prompts stay local


@pytest.mark.parametrize(("prefill", "decode", "settings"), [(1, 1, ()), (2, 2, ()), (1, 1, (LOCAL_PREFILL,))])
def test_cluster_is_token_identical_to_offline(
    prefill: int, decode: int, settings: tuple[str, ...], reference: list[list[int]]
) -> None:
    cluster = ClusterProcess(prefill, decode, *settings)
    try:
        pids = cluster.ready["pids"]
        assert len(pids["prefill"]) == prefill and len(pids["decode"]) == decode
        for role in ("router", "prefill", "decode"):  # ordinary `dcpd serve --role ...` processes
            for pid in pids[role]:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    assert f"--role\0{role}\0".encode() in f.read()
        for stream in (True, False):
            got = asyncio.run(generate_all(cluster.frontend, stream))
            assert got == reference
        with Client(cluster.frontend) as client:
            stats = wait_pools_free(client)
        assert stats["prefill_peers"] == prefill and stats["decode_peers"] == decode
        if decode == 2:  # the load balancer used both decode peers
            log = cluster.log()
            assert all(f'"peer": "decode-{i}"' in log and "decoding" in log for i in range(2))
        log = cluster.log()
        assert '"event": "transferring"' in log
        local = log.count('"event": "prefilling on the decode peer"')
        short = sum(n <= 64 for n in PROMPT_LENGTHS)
        assert local == (2 * short if settings else 0)  # two passes (streamed and not) over the prompts
    finally:
        code = cluster.stop()
    assert code == 0, cluster.log()[-3000:]
    for pid in [p for group in cluster.ready["pids"].values() for p in group]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_a_peer_that_dies_is_started_again_and_the_cluster_keeps_serving(reference) -> None:
    """kill -9 of the only decode peer: the cluster starts it again (the router takes the new process
    for a restart), requests are served again, every pool comes back free, and SIGTERM still ends the
    cluster cleanly (exit 0). Before, the cluster ran on with no decode peer, answering `unavailable`."""
    cluster = ClusterProcess(1, 1)
    try:
        [old] = cluster.ready["pids"]["decode"]
        os.kill(old, signal.SIGKILL)
        with Client(cluster.frontend, timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                stats = client.stats()
                pids = [v for k, v in stats.items() if k.endswith(".pid") and stats[k[:-4] + ".role"] == "decode"]
                if stats["decode_peers"] == 1 and pids and pids[0] != old:
                    break
                assert time.monotonic() < deadline, f"no new decode peer: {stats}"
                time.sleep(0.2)
            params = dict(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            assert client.generate(prompt_ids=prompts()[6], **params).result().token_ids == reference[6]
            wait_pools_free(client)
        assert '"event": "peer started again"' in cluster.log()
    finally:
        code = cluster.stop()
    assert code == 0, cluster.log()[-3000:]


def test_a_peer_that_keeps_dying_stops_the_cluster_with_status_1() -> None:
    """Started again at most 5 times in 60 s, at once the first time, then after 0.5, 1, 2 and 4 s:
    the sixth death of the same peer stops the cluster (exit 1) rather than restarting it for ever,
    and every child goes."""
    cluster = ClusterProcess(1, 1)
    waited = []
    try:
        pid = cluster.ready["pids"]["decode"][0]
        for restart in range(6):
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            while restart < 5:  # the new pid, from the cluster's log line
                lines = [json.loads(line) for line in cluster.log().splitlines() if "peer started again" in line]
                if len(lines) == restart + 1:
                    pid = lines[-1]["pid"]
                    waited.append(time.monotonic() - killed)
                    break
                assert time.monotonic() < killed + 60, cluster.log()[-3000:]
                time.sleep(0.05)
        assert cluster.proc.wait(60) == 1
        assert '"event": "peer keeps dying; stopping the cluster"' in cluster.log()
        delays = [json.loads(line)["delay_s"] for line in cluster.log().splitlines() if "starting it again" in line]
        assert delays == [0.0, 0.5, 1.0, 2.0, 4.0]
        assert all(w >= d for w, d in zip(waited, delays, strict=True)), waited
    finally:
        cluster.stop()
    for pid in [p for group in cluster.ready["pids"].values() for p in group]:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
