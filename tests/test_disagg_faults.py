"""Faults with real processes: kill -9 a decode peer mid-transfer and mid-decode, a prefill peer
mid-prefill, and abort from the client in each stage. Every request ends (tokens or a clear error)
within the configured timeouts, and every surviving peer's block pool returns to fully free."""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections.abc import Callable

import pytest

from dcpd.client import AsyncClient, ServerError
from dcpd.engine import LLMEngine, SamplingParams
from dcpd.model.default import build_default_model
from tests.disagg_harness import Fleet

# Small prefill chunks make a long prompt take dozens of steps: wide windows to kill or abort in.
PREFILL = ["engine.max_tokens_per_batch=32"]
LONG_PROMPT = [random.Random(5).randrange(256) for _ in range(2000)]
SHORT_PROMPT = [random.Random(6).randrange(256) for _ in range(40)]
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet("disagg.kv_timeout_s=10", "disagg.kv_lease_s=10", "disagg.prefill_timeout_s=30")
    try:
        for _ in range(2):
            fleet.add("prefill", *PREFILL, wait=False)
            fleet.add("decode", wait=False)
        fleet.wait_registered()
        yield fleet
    finally:
        killed = {name for name, peer in fleet.peers.items() if peer.proc.poll() is not None}
        codes = fleet.stop()
    survivors = {name: code for name, code in codes.items() if name not in killed}
    assert all(code == 0 for code in survivors.values()), survivors  # SIGTERM drains them cleanly


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    engine = LLMEngine(build_default_model())
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    return {"long": engine.generate([LONG_PROMPT], params)[0].token_ids}


async def wait_stats(
    client: AsyncClient, predicate: Callable[[dict], bool], timeout: float = 30.0, poll: float = 0.005
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = await client.stats()
        if predicate(stats):
            return stats
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met: {stats}")
        await asyncio.sleep(poll)


def in_stage(stats: dict, stages: str) -> bool:
    """`stages`: one stage, or several joined by "|"."""
    return any(stats[f"state.{stage}"] > 0 for stage in stages.split("|"))


# With layer-wise streaming a request moves from prefilling to transferring after its first layer,
# while its prefill goes on: both mean the prefill peer is computing it.
PREFILL_RUNNING = "prefilling|transferring"


def busy_peer(stats: dict, role: str) -> str | None:
    for key, value in stats.items():
        if key.endswith(".assigned") and value > 0:
            name = key.split(".")[1]
            if stats[f"peer.{name}.role"] == role:
                return name
    return None


async def all_free(client: AsyncClient, timeout: float = 15.0) -> dict:
    def free(stats: dict) -> bool:
        peers = {k.split(".")[1] for k in stats if k.startswith("peer.")}
        return stats["inflight"] == 0 and all(
            stats[f"peer.{p}.kv_blocks_free"] == stats[f"peer.{p}.kv_blocks_total"] for p in peers
        )

    return await wait_stats(client, free, timeout, poll=0.1)


def replace(fleet: Fleet, name: str, role: str) -> None:
    fleet.kill(name)
    fleet.add(role, *(PREFILL if role == "prefill" else []), wait=False)
    fleet.wait_registered()


async def disturb(
    fleet: Fleet, stage: str, role: str, prompt: list[int], max_tokens: int, sig: int = signal.SIGKILL
):  # fmt: skip
    """Start a request; once the router reports `stage`, signal the `role` peer serving it: SIGKILL
    (kill -9, reaped), or SIGSTOP (stopped until the request ends, then resumed). Returns the victim,
    the request's outcome (its Finished, or the ServerError) and how long it took after the signal;
    by then every peer's pool is fully free again."""
    async with AsyncClient(fleet.frontend, timeout=60) as client, AsyncClient(fleet.frontend) as watcher:
        stream = await client.generate(prompt_ids=prompt, max_tokens=max_tokens, **GREEDY)
        outcome = asyncio.ensure_future(stream.collect())
        stats = await wait_stats(watcher, lambda s: in_stage(s, stage) and busy_peer(s, role) is not None)
        victim = busy_peer(stats, role)
        if sig == signal.SIGKILL:
            fleet.kill(victim)
        else:
            fleet.peers[victim].proc.send_signal(sig)
        signalled = time.monotonic()
        try:
            result = await outcome
        except ServerError as exc:
            result = exc
        elapsed = time.monotonic() - signalled
        if sig == signal.SIGSTOP:
            fleet.peers[victim].proc.send_signal(signal.SIGCONT)
        await all_free(watcher, timeout=30)
    return victim, result, elapsed


def test_decode_killed_mid_transfer_is_retried_on_another_decode_peer(fleet: Fleet, reference) -> None:
    victim, result, elapsed = asyncio.run(disturb(fleet, "transferring", "decode", LONG_PROMPT, 8))
    assert not isinstance(result, ServerError), result
    assert result.token_ids == reference["long"]  # the retry on the other pair is token-identical
    assert elapsed < 30
    log = fleet.router.log_text()
    assert "peer dropped" in log and victim in log and "attempt failed; retrying" in log
    replace(fleet, victim, "decode")


def test_decode_killed_mid_decode_ends_with_an_error(fleet: Fleet) -> None:
    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=60) as client, AsyncClient(fleet.frontend) as watcher:
            stream = await client.generate(prompt_ids=SHORT_PROMPT, max_tokens=1900, **GREEDY)
            received = 0
            with pytest.raises(ServerError) as info:
                async for chunk in stream:
                    received += len(chunk.token_ids)
                    if received >= 5 and "killed" not in locals():
                        stats = await watcher.stats()
                        victim = busy_peer(stats, "decode")
                        fleet.kill(victim)
                        killed = time.monotonic()
            elapsed = time.monotonic() - killed
            await all_free(watcher)
            return victim, info.value, elapsed

    victim, error, elapsed = asyncio.run(scenario())
    assert error.code == "peer_failed" and victim in str(error) and "tokens were streamed" in str(error)
    assert elapsed < 5  # peer_timeout_s = 1 s
    replace(fleet, victim, "decode")


def test_prefill_killed_mid_prefill_is_retried_on_another_prefill_peer(fleet: Fleet, reference) -> None:
    victim, result, elapsed = asyncio.run(disturb(fleet, PREFILL_RUNNING, "prefill", LONG_PROMPT, 8))
    assert not isinstance(result, ServerError), result
    assert result.token_ids == reference["long"]
    assert elapsed < 30
    replace(fleet, victim, "prefill")


@pytest.mark.parametrize("stage", ["waiting_for_reservation", "prefilling", "transferring", "decoding"])
def test_abort_in_each_stage_frees_every_block(fleet: Fleet, stage: str) -> None:
    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=60) as client, AsyncClient(fleet.frontend) as watcher:
            max_tokens = 1900 - len(LONG_PROMPT) // 20 if stage == "decoding" else 8
            prompt = SHORT_PROMPT if stage == "decoding" else LONG_PROMPT
            stream = await client.generate(prompt_ids=prompt, max_tokens=max_tokens, **GREEDY)
            if stage == "decoding":
                async for _ in stream:
                    break  # one token chunk has arrived: decoding
            elif stage != "waiting_for_reservation":  # that one: abort at once
                await wait_stats(watcher, lambda s: in_stage(s, PREFILL_RUNNING if stage == "prefilling" else stage))
            await stream.abort()
            result = await stream.collect()
            stats = await all_free(watcher)
            return result, stats

    result, stats = asyncio.run(scenario())
    assert result.finish_reason == "abort"
    assert all(stats[f"state.{s}"] == 0 for s in ("prefilling", "transferring", "decoding", "waiting_for_kv"))


def test_kv_streams_layer_by_layer_during_chunked_prefill(fleet: Fleet, reference) -> None:
    import json

    async def run():
        async with AsyncClient(fleet.frontend, timeout=60) as client:
            stream = await client.generate(prompt_ids=LONG_PROMPT, max_tokens=8, request_id="layerwise", **GREEDY)
            return (await stream.collect()).token_ids

    assert asyncio.run(run()) == reference["long"]
    steps = -(-len(LONG_PROMPT) // 32)  # prefill peers run 32-token chunks
    layers = build_default_model().config.num_layers
    lines = [(name, json.loads(line)) for name, peer in fleet.peers.items() if name.startswith("prefill")
             for line in peer.log_text().splitlines() if '"transferred"' in line and "layerwise" in line]  # fmt: skip
    assert len(lines) == 1
    name, line = lines[0]
    assert line["chunks"] == steps * layers  # one message per layer per step
    # logged from a callback the push thread hands to the loop: it still names the peer
    assert (line["role"], line["peer"]) == ("prefill", name)


def test_states_stages_and_transfers_are_in_the_metrics(fleet: Fleet) -> None:
    import urllib.request

    def scrape(port: int) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()

    router = scrape(fleet.router.metrics_port)
    for stage in ("waiting_for_reservation", "prefilling", "transferring", "waiting_for_kv", "decoding"):
        assert f'dcpd_requests_in_state{{state="{stage}"}}' in router
    # waiting_for_kv is only entered when the prefill peer's report beats the decode peer's first token
    for stage in ("waiting_for_reservation", "prefilling", "transferring", "decoding"):
        assert f'dcpd_stage_seconds_count{{stage="{stage}"}}' in router
    assert 'dcpd_peers{role="decode"} 2.0' in router and 'dcpd_request_retries_total{why="peer_died"}' in router
    live = [peer for name, peer in fleet.peers.items() if name.startswith("prefill") and peer.proc.poll() is None]
    prefill = [scrape(peer.metrics_port) for peer in live]
    totals = [float(line.split()[-1]) for text in prefill for line in text.splitlines()
              if line.startswith("dcpd_kv_transfer_bytes_total")]  # fmt: skip
    assert sum(totals) > 0
    assert all("dcpd_kv_transfer_gb_per_second_count" in text for text in prefill)


def test_a_peer_with_another_layout_is_refused_at_registration(fleet: Fleet) -> None:
    name = fleet.add("decode", "engine.block_size=32", wait=False)
    assert fleet.peers[name].proc.wait(120) == 78  # EX_CONFIG: systemd does not restart it
    router_log, peer_log = fleet.router.log_text(), fleet.peers[name].log_text()
    for log in (router_log, peer_log):
        assert f"cannot exchange KV with us: block_size: decode peer {name} has 32, we have 16" in log
    assert name not in {k.split(".")[1] for k in fleet.wait_registered() if k.startswith("peer.")}


def test_bad_peer_messages_get_an_answer_and_the_router_keeps_serving(fleet: Fleet, reference) -> None:
    import zmq

    from dcpd.disagg import messages as m

    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.ROUTING_ID, b"rogue")
    rogue.connect(fleet.router_endpoint)
    try:
        rogue.send(b"\x93not a control message")  # undecodable: logged, ignored
        rogue.send(m.encode(m.Reserved(key="x#1", ok=True)))  # from a peer that never registered
        assert rogue.poll(10000)
        reply = m.decode_router(rogue.recv())
        assert isinstance(reply, m.Registered) and not reply.ok and "not registered" in reply.error
    finally:
        rogue.close(linger=0)
        ctx.term()
    with pytest.raises(m.ControlError, match="control protocol version 9"):
        load = m.PeerLoad(waiting=0, running=0, kv_blocks_free=1, kv_blocks_total=1, kv_blocks_reserve=0)
        m.decode_peer(m.encode(m.Heartbeat(load=load, v=9)))

    async def still_serving():
        async with AsyncClient(fleet.frontend, timeout=60) as client:
            stream = await client.generate(prompt_ids=LONG_PROMPT, max_tokens=8, **GREEDY)
            return (await stream.collect()).token_ids

    assert asyncio.run(still_serving()) == reference["long"]
    assert "bad message from a peer" in fleet.router.log_text()


def test_a_prefill_peer_whose_step_is_stuck_reports_exits_1_and_the_request_moves_on(reference) -> None:
    """0.05 s is "stuck" for prefill-1, which gets the request (ties go to the first name): its first
    step (2,000 prompt tokens) runs longer. It reports the request failed and exits 1; the router
    retries on prefill-3 and the client gets the right tokens."""
    fleet = Fleet("disagg.prefill_timeout_s=30")
    try:
        stuck = fleet.add("prefill", "engine.step_timeout_s=0.05", wait=False)
        fleet.add("decode", wait=False)
        fleet.add("prefill", wait=False)
        fleet.wait_registered()

        async def generate() -> list[int]:
            async with AsyncClient(fleet.frontend, timeout=60) as client:
                stream = await client.generate(prompt_ids=LONG_PROMPT, max_tokens=8, **GREEDY)
                return (await stream.collect()).token_ids

        assert asyncio.run(generate()) == reference["long"]
        assert fleet.peers[stuck].proc.wait(30) == 1
        assert "engine step stuck; exiting" in fleet.peers[stuck].log_text()
        assert "attempt failed; retrying" in fleet.router.log_text()
    finally:
        fleet.stop()


def test_router_killed_peers_free_everything_and_join_a_new_router() -> None:
    import urllib.request

    from tests.daemon_harness import DaemonProcess, start_daemon

    def kv_free(peer: DaemonProcess) -> tuple[float, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{peer.metrics_port}/metrics", timeout=10).read().decode()
        values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("dcpd_kv")}
        return values["dcpd_kv_blocks_free"], values["dcpd_kv_blocks_free"] + values["dcpd_kv_blocks_used"]

    fleet = Fleet()
    try:
        fleet.add("prefill", wait=False)
        fleet.add("decode", wait=False)
        fleet.wait_registered()

        async def start_long_request() -> None:
            client = AsyncClient(fleet.frontend, timeout=60)
            stream = await client.generate(prompt_ids=SHORT_PROMPT, max_tokens=1900, **GREEDY)
            async for _ in stream:
                break  # decoding: the decode peer holds its blocks
            await client.close()

        asyncio.run(start_long_request())
        fleet.router.proc.kill()
        fleet.router.proc.wait(10)
        deadline = time.monotonic() + 15
        while any(kv_free(peer)[0] != kv_free(peer)[1] for peer in fleet.peers.values()):
            assert time.monotonic() < deadline, "a peer kept blocks after its router died"
            time.sleep(0.2)
        fleet.router.stop(5)
        fleet.router = start_daemon(*fleet.settings, extra_args=["--role", "router"])  # same router endpoint
        fleet.wait_registered()

        async def generate() -> list[int]:
            async with AsyncClient(fleet.frontend, timeout=60) as client:
                stream = await client.generate(prompt_ids=SHORT_PROMPT, max_tokens=4, **GREEDY)
                return (await stream.collect()).token_ids

        assert len(asyncio.run(generate())) == 4
        for peer in fleet.peers.values():
            assert "registering again" in peer.log_text() or "router silent" in peer.log_text()
    finally:
        fleet.stop()


def test_stage_timeouts_end_requests_on_stuck_peers_and_cancel_their_work() -> None:
    """A stopped (SIGSTOP) peer keeps its connections but does nothing: with a long peer timeout, the
    stage deadlines end the request. Once resumed, the peer gets the cancel and frees its blocks."""
    fleet = Fleet("disagg.peer_timeout_s=60", "disagg.prefill_timeout_s=8", "disagg.decode_stall_timeout_s=3")
    try:
        fleet.add("prefill", *PREFILL, wait=False)
        fleet.add("prefill", *PREFILL, wait=False)
        fleet.add("decode", wait=False)
        fleet.wait_registered()

        prompt = LONG_PROMPT[:600]  # about 20 chunks: well within the prefill deadline when not stuck
        engine = LLMEngine(build_default_model())
        want = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
        _, result, elapsed = asyncio.run(disturb(fleet, PREFILL_RUNNING, "prefill", prompt, 8, signal.SIGSTOP))
        assert not isinstance(result, ServerError) and result.token_ids == want.token_ids  # retried elsewhere
        assert 2 < elapsed < 30
        _, result, elapsed = asyncio.run(disturb(fleet, "decoding", "decode", SHORT_PROMPT, 1900, signal.SIGSTOP))
        assert isinstance(result, ServerError) and result.code == "peer_failed" and "decoding timed out" in str(result)
        assert 2 < elapsed < 30
    finally:
        for peer in fleet.peers.values():
            peer.proc.send_signal(signal.SIGCONT)
        codes = fleet.stop()
    assert all(code == 0 for code in codes.values()), codes


def test_a_request_whose_only_decode_peer_dies_is_served_by_the_one_started_in_its_place(reference) -> None:
    """1P1D, decode peer killed mid-transfer, and a new one started (as `dcpd cluster` or systemd
    would): with no decode peer left, the request waits (peer_return_grace_s) instead of failing, and
    its retry on the new peer is token-identical. Every pool comes back free. (Generous grace, queue
    timeout and attempts: the new peer starts on a shared 2-core machine.)"""
    fleet = Fleet("disagg.prefill_timeout_s=30", "disagg.peer_return_grace_s=120", "disagg.queue_timeout_s=120",
                  "disagg.max_attempts=5")  # fmt: skip
    try:
        fleet.add("prefill", *PREFILL, wait=False)
        fleet.add("decode", wait=False)
        fleet.wait_registered()

        async def scenario():
            async with AsyncClient(fleet.frontend, timeout=120) as client, AsyncClient(fleet.frontend) as watcher:
                stream = await client.generate(prompt_ids=LONG_PROMPT, max_tokens=8, **GREEDY)
                outcome = asyncio.ensure_future(stream.collect())
                stats = await wait_stats(watcher, lambda s: in_stage(s, "transferring") and busy_peer(s, "decode"))
                fleet.kill(busy_peer(stats, "decode"))
                await wait_stats(watcher, lambda s: s["decode_peers"] == 0)  # dropped: no decode peer at all
                await asyncio.to_thread(fleet.add, "decode", wait=False)
                result = await outcome
                await all_free(watcher, timeout=30)
                return result

        assert asyncio.run(scenario()).token_ids == reference["long"]
        log = fleet.router.log_text()
        assert '"event": "no live peer of a role; requests wait for one"' in log and "attempt failed; retrying" in log
    finally:
        fleet.stop()
