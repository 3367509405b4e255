"""Disaggregation in one process: the prefill engine's KV crosses a real socket into blocks the decode
engine reserved, and decode continues token-identically to a unified run; every block comes back."""

from __future__ import annotations

import asyncio
import random
import tempfile

import msgspec
import pytest
import torch
import zmq

from dcpd.disagg.transfer import KVReceiver, KVSender
from dcpd.engine import FinishReason, LLMEngine, RequestError, SamplingParams
from dcpd.kv.block_pool import KVCacheExhausted
from dcpd.model.default import build_default_model

MODEL = build_default_model()
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(256) for _ in range(n)] for n in (1, 15, 16, 17, 100, 250)]


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


@pytest.fixture
def link():
    with tempfile.TemporaryDirectory(prefix="dpd", dir="/tmp") as tmp:
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(f"ipc://{tmp}/kv")
        yield ctx, router, f"ipc://{tmp}/kv"
        router.close(linger=0)
        ctx.term()


def transfer(
    prefill: LLMEngine, decode: LLMEngine, link, rid: str, prompt: list[int], corrupt: bool = False,
    params: SamplingParams = GREEDY,
):  # fmt: skip
    """Prefill -> first token -> reserve on decode -> push KV -> ack -> adopt. Returns the ack."""
    ctx, router, endpoint = link
    first_params = SamplingParams(max_tokens=1, temperature=params.temperature, top_k=params.top_k,
                                  top_p=params.top_p, seed=params.seed, ignore_eos=True)  # fmt: skip
    prefill.add_request(prompt, first_params, request_id=rid, hold_kv=True)
    drain(prefill)
    first = prefill.requests[rid].output_token_ids[0]
    held = prefill.held_kv[rid]
    reserved = decode.reserve_blocks(rid, len(prompt))
    receiver = KVReceiver(decode.kv_cache)
    receiver.expect(rid, reserved)
    sender = KVSender(prefill.kv_cache, endpoint, context=ctx)
    if corrupt:
        sender.send_chunk(rid, 5, held, layers=(0, 1), last=False)  # out of order: refused
    else:
        sender.send_request(rid, held, layers_per_chunk=2)
    ack = None
    while ack is None:
        ack = receiver.serve_once(router, timeout_ms=10000)
    sender.wait_ack(10)
    sender.close()
    prefill.release_held(rid)  # acknowledged (or failed): the prefill side lets go either way
    if ack.ok:
        decode.add_prefilled_request(rid, prompt, first, params)
    else:
        decode.cancel_reservation(rid)
    return ack


def test_prefill_transfer_decode_equals_unified(link) -> None:
    unified = LLMEngine(MODEL).generate(prompts(), GREEDY)
    prefill, decode = LLMEngine(MODEL), LLMEngine(MODEL)
    for i, prompt in enumerate(prompts()):
        assert transfer(prefill, decode, link, f"r{i}", prompt).ok
    drain(decode)
    for i, want in enumerate(unified):
        got = decode.requests[f"r{i}"]
        assert got.output_token_ids == want.token_ids and got.finish_reason.value == "length"
    for engine in (prefill, decode):
        assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks
        assert not engine.held_kv and not engine.reserved


def test_seeded_sampling_continues_across_the_split(link) -> None:
    """The decode side picks up the request's random sequence where the prefill side left it."""
    seeded = [SamplingParams(max_tokens=20, temperature=0.9, top_k=50, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts()))]  # fmt: skip
    unified = LLMEngine(MODEL).generate(prompts(), seeded)
    prefill, decode = LLMEngine(MODEL), LLMEngine(MODEL)
    for i, prompt in enumerate(prompts()):
        assert transfer(prefill, decode, link, f"s{i}", prompt, params=seeded[i]).ok
    drain(decode)
    for i, want in enumerate(unified):
        assert decode.requests[f"s{i}"].output_token_ids == want.token_ids


def test_failed_transfer_frees_both_sides(link) -> None:
    prefill, decode = LLMEngine(MODEL), LLMEngine(MODEL)
    ack = transfer(prefill, decode, link, "bad", prompts()[4], corrupt=True)
    assert not ack.ok and "seq 5 arrived, expected 0" in ack.error
    assert "bad" not in decode.requests
    for engine in (prefill, decode):
        assert engine.kv_cache.pool.num_free == engine.kv_cache.num_blocks


def test_held_kv_is_released_when_its_lease_expires() -> None:
    prefill = LLMEngine(MODEL)
    prefill.add_request(prompts()[4], FIRST_TOKEN, request_id="x", hold_kv=True)
    prefill.add_request(prompts()[1], FIRST_TOKEN, request_id="y", hold_kv=True)
    drain(prefill)
    assert set(prefill.held_kv) == {"x", "y"} and prefill.kv_cache.pool.num_used > 0
    assert prefill.expire_held(30.0) == []  # still within the lease
    assert sorted(prefill.expire_held(30.0, now=prefill.held_since["x"] + 31)) == ["x", "y"]
    assert prefill.kv_cache.pool.num_free == prefill.kv_cache.num_blocks and not prefill.held_since


def test_a_full_decode_peer_refuses_up_front() -> None:
    from dcpd.batch import DCPPlanConfig
    from dcpd.kv.cache import PagedKVCache

    cfg = MODEL.config
    block = PagedKVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    decode = LLMEngine(MODEL, DCPPlanConfig(kv_cache_bytes=10 * block, kv_reserve_fraction=0.0))
    decode.reserve_blocks("a", 16 * 8)
    with pytest.raises(KVCacheExhausted):
        decode.reserve_blocks("b", 16 * 4)
    assert decode.kv_cache.pool.num_used == 8  # nothing allocated for "b"
    with pytest.raises(RequestError, match="already in use"):
        decode.reserve_blocks("a", 16)
    with pytest.raises(RequestError, match="no reserved blocks"):
        decode.add_prefilled_request("zzz", [1, 2], 3, GREEDY)
    decode.reserve_blocks("c", 16)
    with pytest.raises(RequestError, match=r"first token 258 is outside the vocabulary \[0, 258\)"):
        decode.add_prefilled_request("c", [1, 2], 258, GREEDY)  # a bad token from a peer fails only its request
    assert "c" not in decode.reserved and decode.kv_cache.pool.num_used == 8
    decode.cancel_reservation("a")
    assert decode.kv_cache.pool.num_free == decode.kv_cache.num_blocks


def test_a_local_request_does_not_take_the_reserve_while_kv_is_reserved_for_others() -> None:
    """The reserve is for running requests to grow into, reserved KV included (it becomes running on
    arrival): a request prefilled on the decode peer itself waits for blocks beyond it instead of
    taking it, even with nothing running; once the reservation is gone, it runs."""
    from dcpd.batch import DCPPlanConfig
    from dcpd.kv.cache import PagedKVCache

    cfg = MODEL.config
    block = PagedKVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    decode = LLMEngine(MODEL, DCPPlanConfig(kv_cache_bytes=20 * block, kv_reserve_fraction=0.2))
    decode.reserve_blocks("incoming", 16 * 15)  # 5 blocks left, 4 of them the reserve
    local = decode.add_request(prompts()[2] * 3, FIRST_TOKEN)  # 48 tokens: 3 blocks
    assert decode.step() == [] and decode.kv_cache.pool.num_used == 15
    decode.cancel_reservation("incoming")
    drain(decode)
    assert decode.requests[local].finish_reason == FinishReason.LENGTH
    assert decode.kv_cache.pool.num_used == 0


def test_a_prompt_that_could_never_be_reserved_is_refused_not_kv_full() -> None:
    """Reservations never take the reserve, so a prompt needing more blocks than lie beyond it would
    be refused as kv_full for ever (and wait out the router's queue): it is an invalid request."""
    from dcpd.batch import DCPPlanConfig
    from dcpd.kv.cache import PagedKVCache

    cfg = MODEL.config
    block = PagedKVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    decode = LLMEngine(MODEL, DCPPlanConfig(kv_cache_bytes=10 * block, kv_reserve_fraction=0.2))
    with pytest.raises(RequestError, match="needs 9 KV blocks reserved; this decode peer reserves at most 8 of its 10"):
        decode.reserve_blocks("a", 16 * 9)
    assert decode.reserve_blocks("b", 16 * 8) and decode.kv_cache.pool.num_used == 8
    decode.cancel_reservation("b")
    assert decode.kv_cache.pool.num_free == decode.kv_cache.num_blocks


def test_prefill_only_requests_hold_their_blocks_from_admission_and_are_never_preempted() -> None:
    """A prefill peer streams a request's KV out of its blocks while later chunks compute, so those
    blocks must not change under it. Three 100-token prompts (7 blocks each) in 10 blocks, 32-token
    chunks, each finished request's KV held for two more steps (its acknowledgment on the way):
    chunk-by-chunk allocation preempted the second and third mid-prompt, handing blocks already
    streamed from to another request. hold_kv requests take their whole prompt at admission instead
    (the next waits for room), keep the same blocks to the end, and sample the same first tokens as
    a roomy engine."""
    from dcpd.batch import DCPPlanConfig
    from dcpd.kv.cache import PagedKVCache

    cfg = MODEL.config
    block = PagedKVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    rng = random.Random(11)
    long_prompts = [[rng.randrange(256) for _ in range(100)] for _ in range(3)]
    want = [r.token_ids for r in LLMEngine(MODEL).generate(long_prompts, FIRST_TOKEN)]
    prefill = LLMEngine(MODEL, DCPPlanConfig(kv_cache_bytes=10 * block, kv_reserve_fraction=0.1,
                                             max_tokens_per_batch=32))  # fmt: skip
    for i, p in enumerate(long_prompts):
        prefill.add_request(p, FIRST_TOKEN, request_id=f"p{i}", hold_kv=True)
    first_blocks: dict[str, list[int]] = {}
    held_at: dict[str, int] = {}
    for step in range(100):
        if not (prefill.has_unfinished() or prefill.held_kv):
            break
        prefill.step()
        assert not prefill.last_preempted
        for rid, request in prefill.requests.items():
            if request.block_ids:
                assert first_blocks.setdefault(rid, list(request.block_ids)) == request.block_ids
                assert len(request.block_ids) == 7  # the whole prompt, from its first chunk on
        for rid in list(prefill.held_kv):
            assert prefill.held_kv[rid] == first_blocks[rid]
            if step - held_at.setdefault(rid, step) >= 2:  # acknowledged two steps later
                prefill.release_held(rid)
    assert [prefill.requests[f"p{i}"].output_token_ids for i in range(3)] == want
    assert prefill.kv_cache.pool.num_free == prefill.kv_cache.num_blocks


def test_a_hold_kv_request_is_prefill_only() -> None:
    with pytest.raises(RequestError, match="hold_kv request is prefill-only: max_tokens must be 1, got 20"):
        LLMEngine(MODEL).add_request([1, 2, 3], GREEDY, hold_kv=True)


def test_a_failed_step_keeps_a_hold_kv_requests_blocks_until_they_are_released() -> None:
    """Its first layers' KV may already be streaming out of its blocks when a later layer fails the
    step: the blocks stay held (not handed to the next request) until the owner releases them."""
    engine = LLMEngine(MODEL)
    engine.add_request(prompts()[4], FIRST_TOKEN, request_id="k", hold_kv=True)
    streamed: list[list[int]] = []

    def on_layer(scheduled, layer: int) -> None:
        if layer == 0:
            streamed.append(list(scheduled.scheduled[0].request.block_ids))  # as PrefillPeer pushes them
        else:
            raise RuntimeError("the device ran out of memory in layer 1")

    [output] = engine.step(on_layer)
    assert output.finish_reason == FinishReason.ERROR and "ran out of memory" in output.error
    assert engine.held_kv["k"] == streamed[0]
    assert all(engine.kv_cache.pool.refcount(b) == 1 for b in streamed[0])
    engine.release_held("k")
    assert engine.kv_cache.pool.num_used == 0


def test_an_expired_lease_does_not_free_blocks_the_pusher_still_holds() -> None:
    """A cancelled request's chunks may still be queued in ZeroMQ: its blocks are freed when the pusher
    lets go of them (`_on_released`, delivered on the loop), and a lease running out meanwhile must not
    free them first."""
    asyncio.run(_lease_expires_while_the_pusher_holds_the_blocks())


async def _lease_expires_while_the_pusher_holds_the_blocks() -> None:
    from dcpd.config import load_config
    from dcpd.disagg import messages as m
    from dcpd.disagg.prefill import PrefillPeer
    from dcpd.server.protocol import SamplingOptions

    with tempfile.TemporaryDirectory(prefix="dpl", dir="/tmp") as tmp, zmq.Context() as ctx:
        decode = ctx.socket(zmq.ROUTER)  # a decode peer that takes the KV and never acknowledges it
        decode.bind(f"ipc://{tmp}/kv")
        config = load_config(overrides=[f'disagg.router_endpoint="ipc://{tmp}/r"'])
        peer = PrefillPeer(config, MODEL)
        peer.open()
        pool = peer.engine.kv_cache.pool
        try:
            peer.handle(m.Prefill(key="k", prompt_ids=prompts()[5], sampling=SamplingOptions(temperature=0.0),
                                  decode_peer="d", kv_endpoint=f"ipc://{tmp}/kv"))  # fmt: skip
            while "k" not in peer.engine.held_kv:
                peer._apply_ops()
                peer.after_step(peer.make_step()())
            held = list(peer.engine.held_kv["k"])
            peer.handle(m.Cancel(key="k"))  # the pusher's release can only reach us at the next await
            peer.engine.held_since["k"] -= config.disagg.kv_lease_s + 1
            peer.housekeeping()
            peer._apply_ops()
            assert peer.engine.held_kv.get("k") == held and pool.num_used == len(held)
            for _ in range(200):  # now the loop runs the pusher's release
                await asyncio.sleep(0.05)
                peer._apply_ops()
                if pool.num_used == 0:
                    break
            assert "k" not in peer.engine.held_kv and pool.num_used == 0 and not peer.releasing
        finally:
            peer.pusher.stop()
            peer.close()
            decode.close(linger=0)


def test_a_decode_peer_dropping_everything_answers_the_reservations_it_had_queued() -> None:
    """A failed step (or the drain deadline) makes the decode peer drop everything while the router is
    still there: a Reserve queued for the next step boundary is voided, and must be refused at once
    rather than leave the router waiting out reserve_timeout_s."""
    asyncio.run(_drop_everything_with_a_queued_reserve())


async def _drop_everything_with_a_queued_reserve() -> None:
    from dcpd.config import load_config
    from dcpd.disagg import messages as m
    from dcpd.disagg.decode import DecodePeer
    from dcpd.server.protocol import SamplingOptions

    with tempfile.TemporaryDirectory(prefix="dpd", dir="/tmp") as tmp, zmq.Context() as ctx:
        router = m.control_socket(ctx, zmq.ROUTER)
        router.bind(f"ipc://{tmp}/r")
        config = load_config(
            overrides=[f'disagg.router_endpoint="ipc://{tmp}/r"', f'disagg.kv_endpoint="ipc://{tmp}/kv"']
        )
        peer = DecodePeer(config, MODEL)
        peer.open()
        try:
            peer.handle(m.Reserve(key="k", prompt_ids=[1, 2, 3], sampling=SamplingOptions(temperature=0.0)))
            peer.drop_everything("the engine step failed", report=True)
            assert router.poll(10000)
            _, frame = router.recv_multipart()
            reply = m.decode_peer(frame)
            assert isinstance(reply, m.Reserved) and reply.key == "k" and not reply.ok and reply.code == "kv_full"
            assert "the engine step failed" in reply.error
            peer._apply_ops()  # the voided reservation takes no block
            assert peer.engine.kv_cache.pool.num_used == 0 and not peer.engine.reserved
        finally:
            peer.close()
            router.close(linger=0)


class DecodeUnderTest:
    """A DecodePeer (opened inside a running loop) with a bare ROUTER standing in for the router."""

    def __init__(self, tmp: str, ctx: zmq.Context, *settings: str) -> None:
        from dcpd.config import load_config
        from dcpd.disagg import messages as m
        from dcpd.disagg.decode import DecodePeer

        self.m = m
        self.router = m.control_socket(ctx, zmq.ROUTER)
        self.router.bind(f"ipc://{tmp}/r")
        self.kv_endpoint = f"ipc://{tmp}/kv"
        config = load_config(overrides=[f'disagg.router_endpoint="ipc://{tmp}/r"',
                                        f'disagg.kv_endpoint="{self.kv_endpoint}"', *settings])  # fmt: skip
        self.peer = DecodePeer(config, MODEL)
        self.peer.open()

    def reserve(self, key: str, prompt: list[int], *, here: bool = False) -> None:
        from dcpd.server.protocol import SamplingOptions

        options = SamplingOptions(temperature=0.0, max_tokens=4, ignore_eos=True)
        self.peer.handle(self.m.Reserve(key=key, prompt_ids=prompt, sampling=options, prefill_here=here))
        self.peer._apply_ops()
        assert self.next_message(self.m.Reserved, timeout=1).ok

    def next_message(self, kind: type, timeout: float = 10.0):
        """The next message of this type the peer sent the router (others are skipped)."""
        import time

        deadline = time.monotonic() + timeout
        while self.router.poll(max(int((deadline - time.monotonic()) * 1000), 0)):
            message = self.m.decode_peer(self.router.recv_multipart()[1])
            if isinstance(message, kind):
                return message
        raise TimeoutError(f"no {kind.__name__} from the peer in {timeout} s")

    def close(self) -> None:
        self.peer.close()
        self.router.close(linger=0)


def test_a_stuck_step_reports_the_requests_still_waiting_for_kv_before_the_loop_stops() -> None:
    """A stuck step makes the peer report everything and exit without running its loop again: a request
    whose KV was still on its way must be reported then and there, not in a callback that never runs."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory(prefix="dps", dir="/tmp") as tmp, zmq.Context() as ctx:
            under = DecodeUnderTest(tmp, ctx)
            try:
                under.reserve("k", prompts()[4])
                under.peer.on_step_stuck()  # then the daemon sleeps and exits, never awaiting again
                report = under.next_message(under.m.Output, timeout=2)
                assert report.key == "k" and report.reason == "error" and "stuck" in report.error
                pool = under.peer.engine.kv_cache.pool
                for _ in range(100):  # (were the loop to go on, the KV thread's confirmation frees the blocks)
                    await asyncio.sleep(0.02)
                    under.peer._apply_ops()
                    if pool.num_used == 0:
                        break
                assert pool.num_used == 0 and not under.peer.awaiting
            finally:
                under.close()

    asyncio.run(scenario())


def test_a_request_that_cannot_start_until_kv_arrives_does_not_spin_the_engine_loop() -> None:
    """Reservations hold most of a small cache and a locally prefilled request cannot be admitted
    until they are gone: the engine loop waits for blocks to be freed instead of stepping in a busy
    loop (it competed for the GIL with the KV thread receiving the very data it waits for), and runs
    the request as soon as the reservation is cancelled."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory(prefix="dps", dir="/tmp") as tmp, zmq.Context() as ctx:
            under = DecodeUnderTest(tmp, ctx, "engine.kv_cache_mb=1")
            peer = under.peer
            pool = peer.engine.kv_cache.pool
            try:
                reserved = (pool.num_blocks - pool.reserve_blocks) * 16
                under.reserve("held", [7] * reserved)
                under.reserve("local", [5] * 64, here=True)  # needs 5 blocks; at most the reserve is free
                calls = 0
                make_step = peer.make_step

                def counting_make_step():
                    nonlocal calls
                    calls += 1
                    return make_step()

                peer.make_step = counting_make_step
                loop_task = asyncio.create_task(peer._engine_loop())
                await asyncio.sleep(1.0)
                assert calls <= 15, f"{calls} steps in 1 s with nothing schedulable"
                assert not peer.engine.requests["local"].output_token_ids
                peer.handle(under.m.Cancel(key="held"))
                outputs = []
                while not (outputs and outputs[-1].finished):
                    outputs.append(await asyncio.to_thread(under.next_message, under.m.Output))
                assert [o.key for o in outputs] == ["local"] * len(outputs) and outputs[-1].reason == "length"
                assert sum(len(o.token_ids) for o in outputs) == 4
                loop_task.cancel()
                await asyncio.sleep(0.1)
                peer._apply_ops()
                assert pool.num_used == 0
            finally:
                under.close()

    asyncio.run(scenario())


def test_a_chunk_resent_after_the_kv_was_acknowledged_does_not_fail_the_request() -> None:
    """The last chunk was acknowledged and the request waits to be adopted at the next step boundary;
    a resend of that chunk (or any stray chunk naming it) is refused on the KV socket, and the request
    still starts decoding."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory(prefix="dps", dir="/tmp") as tmp, zmq.Context() as ctx:
            under = DecodeUnderTest(tmp, ctx)
            peer = under.peer
            try:
                prompt = prompts()[4]
                under.reserve("k", prompt)
                prefill = LLMEngine(MODEL)
                blocks = prefill.kv_cache.pool.allocate(-(-len(prompt) // 16))
                sender = KVSender(prefill.kv_cache, under.kv_endpoint, context=ctx)
                sender.send_request("k", blocks, layers_per_chunk=1, first_token=9)
                assert (await asyncio.to_thread(sender.wait_ack, 10)).ok
                layers = prefill.kv_cache.num_layers
                sender.send_chunk("k", layers - 1, blocks, layers=(layers - 1, layers), last=True, first_token=9)
                late = await asyncio.to_thread(sender.wait_ack, 10)
                assert not late.ok and "not expected" in late.error
                await asyncio.sleep(0.2)  # any callback from the KV thread has run
                peer._apply_ops()
                assert "k" in peer.active and "k" in peer.engine.requests
                first = under.next_message(under.m.Output, timeout=2)
                assert first.key == "k" and first.token_ids == [9] and first.error is None
                sender.close()
                peer.handle(under.m.Cancel(key="k"))
                peer._apply_ops()
                assert peer.engine.kv_cache.pool.num_used == 0
            finally:
                under.close()

    asyncio.run(scenario())


def test_a_peer_refuses_a_router_of_another_version_and_messages_for_the_other_role() -> None:
    """A Registered of another control protocol version stops the peer with EX_CONFIG (it would
    otherwise register for ever), and a Prefill sent to a decode peer is refused at once."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory(prefix="dps", dir="/tmp") as tmp, zmq.Context() as ctx:
            under = DecodeUnderTest(tmp, ctx)
            m = under.m
            try:
                from dcpd.server.protocol import SamplingOptions

                prefill = m.Prefill(key="p", prompt_ids=[1, 2], sampling=SamplingOptions(), decode_peer="d",
                                    kv_endpoint="")  # fmt: skip
                under.peer.handle(prefill)
                refused = under.next_message(m.PrefillDone, timeout=2)
                assert refused.key == "p" and not refused.ok and "Prefill sent to a decode peer" in refused.error
                control = asyncio.create_task(under.peer._control_loop())
                await asyncio.sleep(0.2)  # the peer's DEALER has connected
                under.peer._send(m.Heartbeat(load=under.peer.load()))  # for the peer's routing id
                identity, _ = await asyncio.to_thread(under.router.recv_multipart)
                under.router.send_multipart([identity, msgspec.msgpack.encode({"type": "registered", "v": 9,
                                                                               "ok": True})])  # fmt: skip
                await asyncio.wait_for(under.peer.stopped.wait(), 5)
                assert under.peer.exit_code == 78
                control.cancel()
            finally:
                under.close()

    asyncio.run(scenario())


def test_a_prefill_peer_refuses_a_key_it_has_used_and_a_message_for_the_other_role() -> None:
    """A Prefill reusing the key of a cancelled attempt would have its KV dropped by the pusher (it
    takes the chunks for the cancelled attempt's) and fail only at the lease: it is refused at once.
    A duplicate Prefill while draining does not fail the attempt still running. A Reserve sent to a
    prefill peer is refused as an invalid request."""

    async def scenario() -> None:
        from dcpd.config import load_config
        from dcpd.disagg import messages as m
        from dcpd.disagg.prefill import PrefillPeer
        from dcpd.server.protocol import SamplingOptions

        with tempfile.TemporaryDirectory(prefix="dps", dir="/tmp") as tmp, zmq.Context() as ctx:
            router = m.control_socket(ctx, zmq.ROUTER)
            router.bind(f"ipc://{tmp}/r")
            peer = PrefillPeer(load_config(overrides=[f'disagg.router_endpoint="ipc://{tmp}/r"']), MODEL)
            peer.open()

            def next_reply():
                assert router.poll(5000)
                return m.decode_peer(router.recv_multipart()[1])

            try:
                prefill = m.Prefill(key="k", prompt_ids=prompts()[4], sampling=SamplingOptions(temperature=0.0),
                                    decode_peer="d", kv_endpoint=f"ipc://{tmp}/kv")  # fmt: skip
                peer.handle(prefill)
                peer.handle(m.Cancel(key="k"))
                peer.handle(prefill)
                reply = next_reply()
                assert isinstance(reply, m.PrefillDone) and reply.key == "k" and not reply.ok
                assert "key 'k' was already used on this prefill peer" in reply.error
                running = m.Prefill(key="d", prompt_ids=prompts()[3], sampling=SamplingOptions(temperature=0.0),
                                    decode_peer="d", kv_endpoint=f"ipc://{tmp}/kv")  # fmt: skip
                peer.handle(running)
                peer.begin_drain("test")
                assert isinstance(next_reply(), m.Heartbeat)  # the drain tells the router at once
                peer.handle(running)  # a duplicate while draining: ignored, the attempt goes on
                assert not router.poll(300) and "d" in peer.jobs
                peer.handle(m.Cancel(key="d"))
                peer.handle(m.Reserve(key="r", prompt_ids=[1, 2], sampling=SamplingOptions()))
                reply = next_reply()
                assert isinstance(reply, m.Reserved) and not reply.ok and reply.code == "invalid_request"
                assert "Reserve sent to a prefill peer" in reply.error
                peer._apply_ops()
                assert not peer.engine.requests and peer.engine.kv_cache.pool.num_used == 0
            finally:
                peer.pusher.stop()
                peer.close()
                router.close(linger=0)

    asyncio.run(scenario())


def test_a_peer_the_router_never_answers_says_so_while_it_keeps_registering(monkeypatch) -> None:
    """The heartbeat loop of a peer whose router never answers warns every UNANSWERED_WARNING_S (10 s;
    0.3 s here) while it keeps sending Register."""
    from structlog.testing import capture_logs

    import dcpd.disagg.peer

    monkeypatch.setattr(dcpd.disagg.peer, "UNANSWERED_WARNING_S", 0.3)

    async def scenario() -> tuple[list[dict], int]:
        with tempfile.TemporaryDirectory(prefix="dps", dir="/tmp") as tmp, zmq.Context() as ctx:
            under = DecodeUnderTest(tmp, ctx, "disagg.heartbeat_interval_s=0.05")  # its ROUTER never answers
            try:
                with capture_logs() as logs:
                    beating = asyncio.create_task(under.peer._heartbeat_loop())
                    await asyncio.sleep(1.0)
                    beating.cancel()
                registers = 0
                while under.router.poll(0):
                    registers += isinstance(under.m.decode_peer(under.router.recv_multipart()[1]), under.m.Register)
                return logs, registers
            finally:
                under.close()

    logs, registers = asyncio.run(scenario())
    warnings = [entry for entry in logs if entry["event"] == "no answer from the router yet; still registering"]
    assert 2 <= len(warnings) <= 4 and all(entry["silent_s"] >= 0.3 for entry in warnings)
    assert registers >= 10
