"""A real router process driven by scripted peers speaking the control protocol over real sockets:
for event orders that real peers produce only in narrow races (a prefill peer lost between its last
KV chunk and its PrefillDone, a peer sending out-of-range tokens)."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest
import zmq

from dcpd.client import AsyncClient, ServerError
from dcpd.config import Config
from dcpd.disagg import messages as m
from dcpd.disagg.layout import PeerLayout
from dcpd.model.default import default_config
from tests.disagg_harness import Fleet

LAYOUT = PeerLayout.expected(default_config(), block_size=Config().engine.block_size, dtype=Config().model.dtype)
IDLE = m.PeerLoad(waiting=0, running=0, kv_blocks_free=1000, kv_blocks_total=1000, kv_blocks_reserve=0)
GREEDY = {"max_tokens": 2, "temperature": 0.0}


async def abort_all(*streams) -> None:
    """End requests a test left waiting (the router then cancels them on their peers)."""
    for stream in streams:
        await stream.abort()
        await stream.collect()


async def wait_peers(client: AsyncClient, **counts: int) -> None:
    """Until the router counts these peers (`prefill=`, `decode=`): one whose heartbeats stopped is
    dropped after peer_timeout_s (1 s here)."""
    deadline = time.monotonic() + 10
    while True:
        stats = await client.stats()
        if all(stats[f"{role}_peers"] == n for role, n in counts.items()):
            return
        assert time.monotonic() < deadline, f"the router does not count {counts}: {stats}"
        await asyncio.sleep(0.05)


class ScriptedPeer:
    """A DEALER registered with the router; a thread sends heartbeats until `stop_heartbeats()`. The
    test reads what the router sends with `expect()` and answers with `send()`."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        name: str,
        role: str,
        kv_endpoint: str | None,
        load: m.PeerLoad = IDLE,
        boot: str = "",
    ) -> None:
        self.name = name
        self.load = load
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())  # the router names peers by it
        self.sock.connect(endpoint)
        self.lock = threading.Lock()
        self.beating = True
        self.inbox: list[m._Control] = []
        self.send(m.Register(name=name, role=role, layout=LAYOUT, kv_endpoint=kv_endpoint, load=load, pid=1, boot=boot))
        assert isinstance(self.expect(m.Registered), m.Registered)
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def send(self, message: m._Control) -> None:
        with self.lock:
            self.sock.send(m.encode(message))

    def _beat(self) -> None:
        while self.beating:
            self.send(m.Heartbeat(load=self.load))
            time.sleep(0.1)

    def stop_heartbeats(self) -> None:
        self.beating = False
        self.thread.join()

    def expect(self, kind: type, timeout: float = 10.0):
        """The next message of this type from the router (heartbeat acks are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.inbox:
                if isinstance(message, kind):
                    self.inbox.remove(message)
                    return message
            with self.lock:
                if self.sock.poll(10):
                    message = m.decode_router(self.sock.recv())
                    if not isinstance(message, m.HeartbeatAck):
                        self.inbox.append(message)
            time.sleep(0.001)
        raise TimeoutError(f"{self.name}: no {kind.__name__} from the router; got {self.inbox}")

    def close(self) -> None:
        self.beating = False
        self.thread.join()
        self.sock.close(linger=0)


@pytest.fixture
def scripted(request):
    """A router (settings: the test's indirect parameter, if any), and `add(...)` for scripted peers."""
    fleet = Fleet(*getattr(request, "param", ()))
    ctx = zmq.Context()
    peers: list[ScriptedPeer] = []
    try:
        yield fleet, lambda *args: peers.append(ScriptedPeer(ctx, fleet.router_endpoint, *args)) or peers[-1]
    finally:
        for peer in peers:
            peer.close()
        ctx.term()
        assert fleet.stop()["router"] == 0


def test_a_prefill_peer_lost_after_decoding_began_does_not_end_the_request(scripted) -> None:
    """The decode peer has the KV and streams tokens; the prefill peer dies before its PrefillDone
    reaches the router (or the router drops it for missed heartbeats). The request is not the prefill
    peer's any more: it finishes normally, and the decode peer is never told to cancel it."""
    fleet, add = scripted
    prefill = add("p", "prefill", None)
    decode = add("d", "decode", "ipc:///tmp/unused-kv")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            stream = await client.generate(prompt_ids=[5, 6, 7], max_tokens=3, temperature=0.0)
            reserve = await asyncio.to_thread(decode.expect, m.Reserve)
            decode.send(m.Reserved(key=reserve.key, ok=True))
            await asyncio.to_thread(prefill.expect, m.Prefill)  # ... its KV reaches the decode peer, then:
            decode.send(m.Output(key=reserve.key, token_ids=[70]))
            await anext(aiter(stream))
            prefill.stop_heartbeats()  # lost before its PrefillDone
            await asyncio.sleep(2.5)  # peer_timeout_s = 1 s: the router drops it
            decode.send(m.Output(key=reserve.key, token_ids=[71, 72], finished=True, reason="length"))
            rest = await stream.collect()
            return rest

    rest = asyncio.run(scenario())
    assert rest.finish_reason == "length" and rest.token_ids == [70, 71, 72], rest
    assert "peer dropped" in fleet.router.log_text()
    with pytest.raises(TimeoutError):
        decode.expect(m.Cancel, timeout=0.5)


def test_out_of_range_tokens_from_a_decode_peer_end_the_request_with_an_error(scripted) -> None:
    """A peer is not trusted to send valid token ids: an id outside the vocabulary, or an unknown finish
    reason, ends the request with a clear error instead of breaking detokenization."""
    fleet, add = scripted
    add("p", "prefill", None)
    decode = add("d", "decode", "ipc:///tmp/unused-kv")
    vocab = default_config().vocab_size

    async def scenario(output: dict):
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            stream = await client.generate(prompt_ids=[5, 6, 7], max_tokens=3, temperature=0.0)
            reserve = await asyncio.to_thread(decode.expect, m.Reserve)
            decode.send(m.Reserved(key=reserve.key, ok=True))
            decode.send(m.Output(key=reserve.key, token_ids=[70]))
            decode.send(m.Output(key=reserve.key, **output))
            with pytest.raises(ServerError) as info:
                await stream.collect()
            return info.value

    cases = [
        ({"token_ids": [vocab]}, f"token id {vocab}"),
        ({"token_ids": [-1]}, "token id -1"),
        ({"token_ids": [1], "finished": True, "reason": "bogus"}, "finish reason 'bogus'"),
    ]
    for output, named in cases:
        error = asyncio.run(scenario(output))
        assert error.code == "peer_failed" and named in str(error), error
        decode.expect(m.Cancel)


def test_a_peer_whose_name_is_not_its_routing_id_is_refused(scripted) -> None:
    fleet, _ = scripted
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"other")
        sock.connect(fleet.router_endpoint)
        sock.send(m.encode(m.Register(name="d", role="decode", layout=LAYOUT, kv_endpoint="ipc:///tmp/k", load=IDLE,
                                      pid=1)))  # fmt: skip
        assert sock.poll(10000)
        reply = m.decode_router(sock.recv())
    assert isinstance(reply, m.Registered) and not reply.ok and reply.fatal
    assert "registers as 'd' but its socket's routing id is 'other'" in reply.error


def test_a_kv_endpoint_prefill_peers_cannot_connect_to_is_refused(scripted) -> None:
    """A decode peer binds its kv_endpoint and advertises it: a wildcard host binds fine but no prefill
    peer can connect to it. The config refuses it at load; the router refuses it at registration."""
    from dcpd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"disagg.kv_endpoint = 'tcp://\*:5559': prefill peers connect to this"):
        load_config(overrides=['disagg.kv_endpoint="tcp://*:5559"'])
    with pytest.raises(ConfigError, match=r"an ipc path may have at most 107 bytes .*; this has 125"):
        load_config(overrides=[f'disagg.kv_endpoint="ipc:///tmp/{"x" * 120}"'])
    fleet, _ = scripted
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, b"d")
        sock.connect(fleet.router_endpoint)
        sock.send(m.encode(m.Register(name="d", role="decode", layout=LAYOUT, kv_endpoint="tcp://0.0.0.0:5559",
                                      load=IDLE, pid=1)))  # fmt: skip
        assert sock.poll(10000)
        reply = m.decode_router(sock.recv())
    assert isinstance(reply, m.Registered) and not reply.ok and reply.fatal
    assert "kv_endpoint 'tcp://0.0.0.0:5559': prefill peers connect to this address" in reply.error


def test_a_transfer_the_decode_side_failed_is_retried_on_another_decode_peer(scripted) -> None:
    """A PrefillDone that says the decode side failed (refused the KV, unreachable) makes the router
    retry on another decode peer, and send new requests elsewhere for a while; the prefill peer is not
    blamed, and gets the retry."""
    fleet, add = scripted
    prefill = add("p", "prefill", None)
    decodes = [add("d1", "decode", "ipc:///tmp/kv-d1"), add("d2", "decode", "ipc:///tmp/kv-d2")]

    def reserve_on_either() -> tuple[ScriptedPeer, m.Reserve]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for peer in decodes:
                try:
                    return peer, peer.expect(m.Reserve, timeout=0.05)
                except TimeoutError:
                    pass
        raise TimeoutError("no Reserve")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            stream = await client.generate(prompt_ids=[5, 6, 7], max_tokens=2, temperature=0.0)
            first, reserve = await asyncio.to_thread(reserve_on_either)
            first.send(m.Reserved(key=reserve.key, ok=True))
            job = await asyncio.to_thread(prefill.expect, m.Prefill)
            assert job.decode_peer == first.name
            prefill.send(m.PrefillDone(key=job.key, ok=False, error="not taking KV", decode_side=True))
            await asyncio.to_thread(first.expect, m.Cancel)
            second, retry = await asyncio.to_thread(reserve_on_either)
            second.send(m.Reserved(key=retry.key, ok=True))
            job = await asyncio.to_thread(prefill.expect, m.Prefill)  # the same prefill peer, not blamed
            prefill.send(m.PrefillDone(key=job.key, ok=True))
            second.send(m.Output(key=retry.key, token_ids=[70, 71], finished=True, reason="length"))
            result = await stream.collect()
            # For peer_timeout_s, new requests avoid the decode peer too (an unreachable kv_endpoint
            # would fail them all), though it has as much room as the other.
            await client.generate(prompt_ids=[8, 9], max_tokens=2, temperature=0.0)
            again, _ = await asyncio.to_thread(reserve_on_either)
            assert again is second
            return first, second, job, result

    first, second, job, result = asyncio.run(scenario())
    assert second is not first and job.decode_peer == second.name and job.kv_endpoint == f"ipc:///tmp/kv-{second.name}"
    assert result.token_ids == [70, 71] and result.finish_reason == "length"
    assert f"to decode peer {first.name}: not taking KV" in fleet.router.log_text()


def test_a_request_goes_to_a_decode_peer_whose_cache_can_hold_all_of_it(scripted) -> None:
    """Decode peers of different sizes: a 2-block peer with more free room than a big but busy one is
    not offered a request that will grow to 3 blocks (it would refuse it, ending the request)."""
    fleet, add = scripted
    add("p", "prefill", None)
    small = add(
        "small",
        "decode",
        "ipc:///tmp/kv-s",
        m.PeerLoad(waiting=0, running=0, kv_blocks_free=2, kv_blocks_total=2, kv_blocks_reserve=0),
    )
    big = add(
        "big",
        "decode",
        "ipc:///tmp/kv-b",
        m.PeerLoad(waiting=0, running=9, kv_blocks_free=1, kv_blocks_total=1000, kv_blocks_reserve=0),
    )

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            await client.generate(prompt_ids=[5, 6, 7], max_tokens=40, temperature=0.0)  # 43 tokens: 3 blocks
            return await asyncio.to_thread(big.expect, m.Reserve)

    assert asyncio.run(scenario()).prompt_ids == [5, 6, 7]
    with pytest.raises(TimeoutError):
        small.expect(m.Reserve, timeout=0.5)


def test_a_prompt_no_decode_peer_could_ever_reserve_is_refused_at_once(scripted) -> None:
    """Decode peers reserve a prompt's blocks outside their reserve. A 9-block prompt on peers with 10
    blocks, 2 of them reserve, fits their caches but can never be reserved: the client is told so at
    once (invalid_request), not after the queue timeout; an 8-block prompt still goes through."""
    fleet, add = scripted
    add("p", "prefill", None)
    load = m.PeerLoad(waiting=0, running=0, kv_blocks_free=10, kv_blocks_total=10, kv_blocks_reserve=2)
    decode = add("d", "decode", "ipc:///tmp/unused-kv", load)

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            started = time.monotonic()
            with pytest.raises(ServerError) as refused:
                await (await client.generate(prompt_ids=[5] * 129, max_tokens=1, temperature=0.0)).collect()
            waited = time.monotonic() - started
            await client.generate(prompt_ids=[5] * 128, max_tokens=1, temperature=0.0)
            return refused.value, waited, await asyncio.to_thread(decode.expect, m.Reserve)

    error, waited, reserve = asyncio.run(scenario())
    assert error.code == "invalid_request" and waited < 5
    assert "9 of them reserved up front for the prompt" in str(error) and "reserves at most 8" in str(error)
    assert len(reserve.prompt_ids) == 128


def test_a_reused_request_id_gets_a_new_attempt_key_and_late_messages_of_the_old_one_are_ignored(scripted) -> None:
    """A client may send a new request with the id of one it aborted while its peers still hold the old
    attempt (a queued cancel, a forgotten key). The new attempt must not share the old one's key, and
    the old attempt's late messages must not reach the new request."""
    fleet, add = scripted
    prefill = add("p", "prefill", None)
    decode = add("d", "decode", "ipc:///tmp/unused-kv")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            first = await client.generate(prompt_ids=[5, 6, 7], max_tokens=2, temperature=0.0, request_id="x")
            old = await asyncio.to_thread(decode.expect, m.Reserve)
            decode.send(m.Reserved(key=old.key, ok=True))
            await asyncio.to_thread(prefill.expect, m.Prefill)
            await first.abort()
            await asyncio.to_thread(decode.expect, m.Cancel)
            second = await client.generate(prompt_ids=[5, 6, 7], max_tokens=2, temperature=0.0, request_id="x")
            new = await asyncio.to_thread(decode.expect, m.Reserve)
            decode.send(m.Output(key=old.key, token_ids=[99], finished=True, reason="length"))  # late, old attempt
            decode.send(m.Reserved(key=new.key, ok=True))
            await asyncio.to_thread(prefill.expect, m.Prefill)
            decode.send(m.Output(key=new.key, token_ids=[70, 71], finished=True, reason="length"))
            return old.key, new.key, await second.collect()

    old_key, new_key, result = asyncio.run(scenario())
    assert old_key != new_key
    assert result.token_ids == [70, 71] and result.finish_reason == "length"


@pytest.mark.parametrize("scripted", [("disagg.peer_return_grace_s=1",)], indirect=True)
def test_a_queued_request_ends_when_no_decode_peer_came_back_within_the_grace(scripted) -> None:
    """A request queued because the only decode peer is full must not wait out queue_timeout_s when
    that peer dies and no other registers within peer_return_grace_s: it is then told `unavailable`,
    as a new request would be."""
    fleet, add = scripted
    add("p", "prefill", None)
    full = m.PeerLoad(waiting=0, running=4, kv_blocks_free=0, kv_blocks_total=1000, kv_blocks_reserve=0)
    decode = add("d", "decode", "ipc:///tmp/unused-kv", full)

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            stream = await client.generate(prompt_ids=[5, 6, 7], max_tokens=2, temperature=0.0)
            await asyncio.sleep(0.5)  # queued: the decode peer has no free block
            decode.stop_heartbeats()  # the router drops it after peer_timeout_s = 1 s
            started = time.monotonic()
            with pytest.raises(ServerError) as info:
                await stream.collect()
            return info.value, time.monotonic() - started

    error, waited = asyncio.run(scenario())
    assert error.code == "unavailable" and "no decode peer is serving (none registered for 1 s)" in error.message
    assert 1.5 < waited < 10  # peer_timeout_s 1 s, then the grace; queue_timeout_s is 60 s
    with pytest.raises(TimeoutError):
        decode.expect(m.Reserve, timeout=0.2)


def test_a_peer_restarted_with_the_same_pid_is_a_new_peer(scripted) -> None:
    """In a container a peer runs as PID 1 every time: a restart that registers again within
    peer_timeout_s must still count as a restart (its boot id differs), so the requests the old process
    held are retried at once instead of waiting out their stage timeouts."""
    fleet, add = scripted
    add("p", "prefill", None)
    old = add("d", "decode", "ipc:///tmp/unused-kv", IDLE, "boot-1")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            stream = await client.generate(prompt_ids=[5, 6, 7], max_tokens=2, temperature=0.0)
            first = await asyncio.to_thread(old.expect, m.Reserve)
            old.close()  # the process dies; the new one (same name, same pid 1) registers at once
            new = await asyncio.to_thread(add, "d", "decode", "ipc:///tmp/unused-kv", IDLE, "boot-2")
            assert not any(isinstance(x, m.Reserve) for x in new.inbox)  # none before Registered: a peer ignores it
            retried = await asyncio.to_thread(new.expect, m.Reserve, 5.0)  # reserve_timeout_s is longer
            new.send(m.Reserved(key=retried.key, ok=True, code=None))
            new.send(m.Output(key=retried.key, token_ids=[70, 71], finished=True, reason="length"))
            return first.key, retried.key, await stream.collect()

    first_key, retried_key, result = asyncio.run(scenario())
    assert retried_key != first_key and result.token_ids == [70, 71]
    assert "registered again (restarted)" in fleet.router.log_text()


def test_a_peer_of_another_control_protocol_version_is_refused_for_good(scripted) -> None:
    """A Register the router cannot decode because it is of another protocol version gets a fatal
    refusal naming both versions (the peer exits 78), instead of no answer and retries for ever."""
    fleet, _ = scripted
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"future")
    sock.connect(fleet.router_endpoint)
    try:
        sock.send(msgspec.msgpack.encode({"type": "register", "v": 2, "name": "future", "shards": 4}))
        assert sock.poll(5000)
        reply = m.decode_router(sock.recv())
        assert isinstance(reply, m.Registered) and not reply.ok and reply.fatal
        assert "control protocol version 2 is not supported (the router speaks 1)" in reply.error
    finally:
        sock.close()
        ctx.term()


def test_a_request_waiting_for_room_is_not_overtaken_by_later_smaller_ones(scripted) -> None:
    """First come, first served: while a request waits for a decode peer with room for its prompt, a
    later one that would fit now waits behind it (else a steady stream of small requests could starve
    a big one until queue_timeout_s), and the queue is served in order once there is room."""
    fleet, add = scripted
    add("p", "prefill", None)
    busy = m.PeerLoad(waiting=0, running=1, kv_blocks_free=10, kv_blocks_total=1000, kv_blocks_reserve=0)
    decode = add("d", "decode", "ipc:///tmp/unused-kv", busy)

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            big = await client.generate(prompt_ids=[1] * 16 * 15, **GREEDY)  # 15 blocks: waits for room
            await asyncio.sleep(0.3)
            small = await client.generate(prompt_ids=[2] * 16 * 2, **GREEDY)  # 2 blocks: would fit now
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(decode.expect, m.Reserve, 0.5)
            decode.load = msgspec.structs.replace(busy, running=0, kv_blocks_free=20)  # the running one ended
            reserves = [await asyncio.to_thread(decode.expect, m.Reserve) for _ in range(2)]
            await abort_all(big, small)
            return reserves

    first, second = asyncio.run(scenario())
    assert (len(first.prompt_ids), len(second.prompt_ids)) == (16 * 15, 16 * 2)


@pytest.mark.parametrize("scripted", [("disagg.peer_return_grace_s=1",)], indirect=True)
def test_a_request_waiting_for_one_decode_peer_does_not_hold_up_those_another_can_serve(scripted) -> None:
    """First come, first served is per decode peer: a request waiting for room on the only peer big
    enough for it does not stop a later one that another peer can serve now. When that big peer is
    gone for good (not back within peer_return_grace_s), the waiting request ends (unavailable,
    naming the sizes) instead of waiting out queue_timeout_s."""
    fleet, add = scripted
    add("p", "prefill", None)
    full = m.PeerLoad(waiting=0, running=4, kv_blocks_free=0, kv_blocks_total=1000, kv_blocks_reserve=0)
    big_peer = add("big", "decode", "ipc:///tmp/unused-kv1", full)
    small_peer = add(
        "small",
        "decode",
        "ipc:///tmp/unused-kv2",
        m.PeerLoad(waiting=0, running=0, kv_blocks_free=20, kv_blocks_total=20, kv_blocks_reserve=0),
    )

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            big = await client.generate(prompt_ids=[1] * 16 * 30, **GREEDY)  # only "big" can ever hold it
            await asyncio.sleep(0.3)
            small = await client.generate(prompt_ids=[2] * 16 * 2, **GREEDY)
            reserve = await asyncio.to_thread(small_peer.expect, m.Reserve, 2.0)  # not queued behind `big`
            big_peer.stop_heartbeats()  # dropped after peer_timeout_s = 1 s
            started = time.monotonic()
            with pytest.raises(ServerError) as info:
                await big.collect()
            await abort_all(small)
            return info.value, reserve, time.monotonic() - started

    error, reserve, waited = asyncio.run(scenario())
    assert len(reserve.prompt_ids) == 16 * 2
    assert error.code == "unavailable" and "no decode peer left can take it" in error.message
    assert "the largest decode peer has 20" in error.message and 1.5 < waited < 10  # queue_timeout_s is 60 s


def test_refused_reservations_go_back_to_the_queue_in_arrival_order(scripted) -> None:
    """Two reservations a decode peer refuses (kv_full) go back to the queue where their requests
    arrived: ahead of a request that arrived after them and was queued meanwhile, and in their own
    order. When the peer has room again, the earliest is offered it first."""
    fleet, add = scripted
    add("p", "prefill", None)
    room = m.PeerLoad(waiting=0, running=0, kv_blocks_free=10, kv_blocks_total=1000, kv_blocks_reserve=0)
    decode = add("d", "decode", "ipc:///tmp/unused-kv", room)

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            first = await client.generate(prompt_ids=[1] * 16 * 4, **GREEDY)
            a = await asyncio.to_thread(decode.expect, m.Reserve)
            second = await client.generate(prompt_ids=[2] * 16 * 4, **GREEDY)
            b = await asyncio.to_thread(decode.expect, m.Reserve)
            third = await client.generate(prompt_ids=[3] * 16 * 4, **GREEDY)  # 2 blocks of room left: queued
            decode.load = msgspec.structs.replace(room, kv_blocks_free=0)  # until both refusals are in
            await asyncio.sleep(0.3)
            for refused in (a, b):  # appended: [third, a, b]; pushed to the front: [b, a, third]
                decode.send(m.Reserved(key=refused.key, ok=False, code="kv_full", error="full"))
            await asyncio.sleep(0.3)
            decode.load = room  # room for two of them
            again = [await asyncio.to_thread(decode.expect, m.Reserve) for _ in range(2)]
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(decode.expect, m.Reserve, 0.3)
            await abort_all(first, second, third)
            return again

    again = asyncio.run(scenario())
    assert [reserve.prompt_ids[0] for reserve in again] == [1, 2]


def test_requests_wait_for_a_decode_peer_to_register_again(scripted) -> None:
    """While the only decode peer is gone (a restart), a queued request and a new one wait, within
    peer_return_grace_s, and go to the decode peer that registers next: neither is told
    `unavailable`."""
    fleet, add = scripted
    add("p", "prefill", None)
    full = m.PeerLoad(waiting=0, running=4, kv_blocks_free=0, kv_blocks_total=1000, kv_blocks_reserve=0)
    old = add("d", "decode", "ipc:///tmp/unused-kv", full)

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            queued = await client.generate(prompt_ids=[1] * 20, **GREEDY)  # no room on the full peer
            old.stop_heartbeats()
            await wait_peers(client, decode=0)
            await asyncio.sleep(0.5)  # several ticks with no decode peer
            new = await client.generate(prompt_ids=[2] * 20, **GREEDY)
            await asyncio.sleep(0.2)
            stats = await client.stats()
            restarted = await asyncio.to_thread(add, "d2", "decode", "ipc:///tmp/unused-kv2")
            reserves = [await asyncio.to_thread(restarted.expect, m.Reserve) for _ in range(2)]
            await abort_all(queued, new)
            return stats, reserves

    stats, reserves = asyncio.run(scenario())
    assert stats["queued"] == 2 and stats["decode_peers"] == 0
    assert [r.prompt_ids for r in reserves] == [[1] * 20, [2] * 20]  # in arrival order


def test_a_request_only_a_restarting_decode_peer_can_hold_waits_for_it(scripted) -> None:
    """The only decode peer big enough for a request is dropped while the request waits for room on
    it: within peer_return_grace_s the request keeps waiting, a new request as big is accepted rather
    than refused, and both go to that peer once it registers again (restarted: a new boot)."""
    fleet, add = scripted
    add("p", "prefill", None)
    full = m.PeerLoad(waiting=0, running=4, kv_blocks_free=0, kv_blocks_total=1000, kv_blocks_reserve=0)
    big_peer = add("big", "decode", "ipc:///tmp/unused-kv1", full)
    add("small", "decode", "ipc:///tmp/unused-kv2",
        m.PeerLoad(waiting=0, running=0, kv_blocks_free=20, kv_blocks_total=20, kv_blocks_reserve=0))  # fmt: skip

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            first = await client.generate(prompt_ids=[1] * 16 * 30, **GREEDY)  # only "big" can ever hold it
            big_peer.stop_heartbeats()
            await wait_peers(client, decode=1)
            await asyncio.sleep(0.5)
            second = await client.generate(prompt_ids=[2] * 16 * 30, **GREEDY)
            await asyncio.sleep(0.2)
            queued = (await client.stats())["queued"]
            back = await asyncio.to_thread(add, "big", "decode", "ipc:///tmp/unused-kv1", IDLE, "new-boot")
            reserves = [await asyncio.to_thread(back.expect, m.Reserve) for _ in range(2)]
            await abort_all(first, second)
            return queued, reserves

    queued, reserves = asyncio.run(scenario())
    assert queued == 2
    assert [r.prompt_ids[0] for r in reserves] == [1, 2]


@pytest.mark.parametrize("scripted", [("disagg.max_attempts=1",)], indirect=True)
def test_a_prefill_peer_lost_before_the_reservation_is_answered_costs_no_attempt(scripted) -> None:
    """The only prefill peer is dropped between the Reserve and its answer: the request waits for a
    prefill peer to register again (its reservation is cancelled and made anew) instead of failing,
    even with max_attempts = 1, and the new prefill peer gets it."""
    fleet, add = scripted
    old = add("p", "prefill", None)
    decode = add("d", "decode", "ipc:///tmp/unused-kv")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            stream = await client.generate(prompt_ids=[1] * 20, **GREEDY)
            first = await asyncio.to_thread(decode.expect, m.Reserve)
            old.stop_heartbeats()
            await wait_peers(client, prefill=0)
            decode.send(m.Reserved(key=first.key, ok=True))
            cancel = await asyncio.to_thread(decode.expect, m.Cancel)
            with pytest.raises(TimeoutError):  # no prefill peer: it waits
                await asyncio.to_thread(decode.expect, m.Reserve, 0.5)
            new = await asyncio.to_thread(add, "p2", "prefill", None)
            second = await asyncio.to_thread(decode.expect, m.Reserve)
            decode.send(m.Reserved(key=second.key, ok=True))
            prefill = await asyncio.to_thread(new.expect, m.Prefill)
            await abort_all(stream)
            return first, cancel, second, prefill

    first, cancel, second, prefill = asyncio.run(scenario())
    assert cancel.key == first.key and second.key != first.key and prefill.key == second.key


@pytest.mark.parametrize("scripted", [("disagg.local_prefill_max_tokens=32",)], indirect=True)
def test_with_no_prefill_peer_a_prompt_prefilled_on_the_decode_peer_anyway_is_still_served(scripted) -> None:
    """Conditional disaggregation prefills prompts of at most 32 tokens on the decode peer: while no
    prefill peer is serving, such a prompt still goes to the decode peer at once; a longer one waits
    for a prefill peer, and does not hold the short one up."""
    fleet, add = scripted
    prefill = add("p", "prefill", None)
    decode = add("d", "decode", "ipc:///tmp/unused-kv")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            prefill.stop_heartbeats()
            await wait_peers(client, prefill=0)
            long = await client.generate(prompt_ids=[1] * 40, **GREEDY)
            short = await client.generate(prompt_ids=[2] * 20, **GREEDY)
            reserve = await asyncio.to_thread(decode.expect, m.Reserve)
            with pytest.raises(TimeoutError):
                await asyncio.to_thread(decode.expect, m.Reserve, 0.5)
            await abort_all(long, short)
            return reserve

    reserve = asyncio.run(scenario())
    assert reserve.prompt_ids == [2] * 20 and reserve.prefill_here


@pytest.mark.parametrize("scripted", [("disagg.peer_return_grace_s=1",)], indirect=True)
def test_the_grace_for_a_draining_peer_starts_when_it_leaves(scripted) -> None:
    """A rolling restart of the only decode peer: while it drains (longer than peer_return_grace_s),
    it is no longer offered requests, yet it is still registered, so requests wait rather than end;
    the grace starts only once it is dropped, and the peer registering next gets them."""
    fleet, add = scripted
    add("p", "prefill", None)
    old = add("d", "decode", "ipc:///tmp/unused-kv")

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            old.load = msgspec.structs.replace(IDLE, draining=True)
            await asyncio.sleep(0.5)  # a few heartbeats: the router knows it drains
            stream = await client.generate(prompt_ids=[1] * 20, **GREEDY)
            await asyncio.sleep(2.5)  # drains for longer than the grace
            old.stop_heartbeats()
            await wait_peers(client, decode=0)
            stats = await client.stats()
            new = await asyncio.to_thread(add, "d2", "decode", "ipc:///tmp/unused-kv2")
            reserve = await asyncio.to_thread(new.expect, m.Reserve)
            await abort_all(stream)
            return stats, reserve

    stats, reserve = asyncio.run(scenario())
    assert stats["queued"] == 1 and reserve.prompt_ids == [1] * 20


def test_a_request_the_returning_decode_peer_cannot_hold_ends_when_it_registers(scripted) -> None:
    """With no decode peer registered, a request is accepted and waits (the peer may come back bigger);
    when one registers and neither it nor any dropped one could hold the request, it ends at once
    (unavailable, naming the sizes) rather than waiting out queue_timeout_s."""
    fleet, add = scripted
    add("p", "prefill", None)
    small = m.PeerLoad(waiting=0, running=0, kv_blocks_free=20, kv_blocks_total=20, kv_blocks_reserve=0)
    old = add("d", "decode", "ipc:///tmp/unused-kv", small)

    async def scenario():
        async with AsyncClient(fleet.frontend, timeout=30) as client:
            old.stop_heartbeats()
            await wait_peers(client, decode=0)
            stream = await client.generate(prompt_ids=[1] * 16 * 30, **GREEDY)  # 30 blocks: more than "d" has
            await asyncio.sleep(0.3)
            queued = (await client.stats())["queued"]
            await asyncio.to_thread(add, "d", "decode", "ipc:///tmp/unused-kv", small, "new-boot")
            started = time.monotonic()
            with pytest.raises(ServerError) as info:
                await stream.collect()
            return queued, info.value, time.monotonic() - started

    queued, error, waited = asyncio.run(scenario())
    assert queued == 1 and waited < 5  # queue_timeout_s is 60 s
    assert error.code == "unavailable" and "the largest decode peer has 20" in error.message
