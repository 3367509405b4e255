"""The daemon end to end: real subprocess, real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request

import msgspec
import pytest
import zmq

from dcpd.batch import DCPPlanConfig
from dcpd.client import AsyncClient, Client, Overloaded, ServerError
from dcpd.engine import LLMEngine, SamplingParams
from dcpd.model.default import build_default_model
from dcpd.server import protocol as p
from tests.daemon_harness import start_daemon

LONG = {"max_tokens": 1500, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon("server.max_inflight_per_client=6", "server.max_message_bytes=65536")
    yield d
    assert d.stop() == 0


def wait_idle(client: Client, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = client.stats()
        if stats["inflight"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon not idle: {stats}")
        time.sleep(0.05)


def test_concurrent_clients_get_the_offline_engines_tokens(daemon) -> None:
    prompts = [[(i * 37 + j) % 256 for j in range(n)] for i, n in enumerate((1, 5, 17, 40, 90, 3, 64, 130))]
    params = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    expected = LLMEngine(build_default_model(), DCPPlanConfig()).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    )

    async def one_client(index: int) -> list[list[int]]:
        async with AsyncClient(daemon.endpoint, timeout=60) as client:
            streams = [await client.generate(prompt_ids=prompts[(index + k) % 8], **params) for k in range(3)]
            return [(await s.collect()).token_ids for s in streams]

    async def main() -> list[list[list[int]]]:
        return await asyncio.gather(*(one_client(i) for i in range(8)))

    results = asyncio.run(main())
    for index, outputs in enumerate(results):
        for k, tokens in enumerate(outputs):
            assert tokens == expected[(index + k) % 8].token_ids


def test_streaming_order_and_text(daemon) -> None:
    with Client(daemon.endpoint) as client:
        stream = client.generate(prompt="Hello there", max_tokens=30, temperature=0.0, ignore_eos=True)
        chunks = list(stream)
        final = stream.finished
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == final.token_ids and len(final.token_ids) == 30
    assert "".join(c.text for c in chunks) == final.text or final.text.endswith("\ufffd")
    assert final.prompt_ids == list(b"Hello there") and final.usage.prompt_tokens == 11
    assert final.usage.completion_tokens == 30 and final.usage.ttft_ms > 0


def test_non_streaming_sends_only_the_final_message(daemon) -> None:
    with Client(daemon.endpoint) as client:
        stream = client.generate(prompt_ids=[1, 2], max_tokens=5, temperature=0.0, ignore_eos=True, stream=False)
        assert list(stream) == [] and len(stream.finished.token_ids) == 5


def test_abort_mid_stream_frees_blocks(daemon) -> None:
    with Client(daemon.endpoint) as client:
        stream = client.generate(prompt_ids=list(range(200)), **LONG)
        first = next(iter(stream))
        assert first.seq == 0
        stream.abort()
        result = stream.result()
        assert result.finish_reason == "abort" and len(result.token_ids) < 1500
        wait_idle(client)


def test_disconnected_client_frees_blocks(daemon) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(daemon.endpoint)
    sock.send(p.encode(p.Generate(request_id="gone", prompt_ids=list(range(100)), sampling=p.SamplingOptions(**LONG))))
    assert p.decode_server(sock.recv()).request_id == "gone"  # it is running
    sock.close(linger=0)
    ctx.term()
    with Client(daemon.endpoint) as client:
        wait_idle(client)


def raw_exchange(endpoint: str, frames: list[bytes], timeout_ms: int = 10000) -> p.ServerMessage | None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        if not sock.poll(timeout_ms):
            return None
        return p.decode_server(sock.recv())
    finally:
        sock.close(linger=0)
        ctx.term()


def gen(**fields) -> bytes:
    return msgspec.msgpack.encode({"type": "generate", "request_id": "bad", **fields})


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [
        ([b"\xc1\x00garbage"], "bad_message", "malformed"),
        ([gen(prompt_ids=[1]), b"extra"], "bad_frames", "got 2"),
        ([msgspec.msgpack.encode({"type": "teleport", "request_id": "bad"})], "unknown_type", "teleport"),
        ([gen(prompt_ids="not a list")], "bad_message", "prompt_ids"),
        ([gen(prompt_ids=[1], sampling={"max_tokens": "many"})], "bad_message", "sampling.max_tokens"),
        ([gen(prompt_ids=[1], v=99)], "unsupported_version", "99"),
        ([gen(prompt_ids=[1] * 2100)], "invalid_request", "exceeds the model's context"),
        ([gen(prompt_ids=[1], sampling={"max_tokens": 0})], "invalid_request", "max_tokens=0"),
        ([gen(prompt_ids=[7, 9999])], "invalid_request", "outside the vocabulary"),
        ([gen(prompt_ids=[])], "invalid_request", "prompt is empty"),
        ([gen()], "invalid_request", "exactly one of prompt or prompt_ids"),
        ([msgspec.msgpack.encode({"type": "abort", "request_id": "nope"})], "unknown_request_id", "no such"),
    ],
)
def test_malformed_input_gets_an_error_and_the_daemon_keeps_serving(daemon, frames, code, words) -> None:
    reply = raw_exchange(daemon.endpoint, frames)
    assert isinstance(reply, p.Error), reply
    assert reply.code == code and words in reply.message
    with Client(daemon.endpoint) as client:
        assert client.generate(prompt_ids=[1, 2], max_tokens=3, temperature=0.0).result().finish_reason in (
            "stop", "length",
        )  # fmt: skip


def test_duplicate_request_id_and_oversized_frames(daemon) -> None:
    with Client(daemon.endpoint) as client:
        first = client.generate(prompt_ids=[1, 2, 3], request_id="same", **LONG)
        second = client.generate(prompt_ids=[1, 2, 3], request_id="same", **LONG)
        with pytest.raises(ServerError, match="duplicate_request_id"):
            # the error for the second send is addressed to the same request id
            for _ in second:
                pass
        first.abort()
        first_result = first.result() if first.finished is None else first.finished
        assert first_result.finish_reason == "abort"
    # a frame over max_message_bytes (64 KiB here) is refused by ZMQ: no reply, connection dropped
    assert raw_exchange(daemon.endpoint, [gen(prompt_ids=[1] * 70000)], timeout_ms=1500) is None
    with Client(daemon.endpoint) as client:
        assert client.health() == "serving"
        wait_idle(client)


def test_per_client_limit_answers_overloaded(daemon) -> None:
    with Client(daemon.endpoint) as client:
        streams = [client.generate(prompt_ids=[5, 6], **LONG) for _ in range(6)]
        extra = client.generate(prompt_ids=[5, 6], **LONG)
        with pytest.raises(Overloaded):
            extra.result()
        for stream in streams:
            stream.abort()
        for stream in streams:
            assert stream.result().finish_reason == "abort"
        wait_idle(client)


def test_metrics_endpoint(daemon) -> None:
    with Client(daemon.endpoint) as client:
        client.generate(prompt_ids=[1, 2, 3], max_tokens=4, temperature=0.0, ignore_eos=True).result()
    body = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("dcpd_requests_total{reason=\"length\"}", "dcpd_ttft_seconds_bucket", "dcpd_kv_blocks_free",
                 "dcpd_errors_total{code=", "dcpd_generation_tokens_total", "dcpd_queue_depth"):  # fmt: skip
        assert name in body, name


def test_generate_cli_matches_run_cli(daemon) -> None:
    args = ["--prompt", "hey", "--prompt-ids", "9,8,7", "--max-tokens", "6", "--temperature", "0", "--json"]
    served = dcpd("generate", "--endpoint", daemon.endpoint, *args)
    offline = dcpd("run", *args)
    assert served.returncode == 0 and offline.returncode == 0, served.stderr + offline.stderr
    served_records = [json.loads(line) for line in served.stdout.splitlines()]
    assert served_records == [json.loads(line) for line in offline.stdout.splitlines()]
    assert [r["prompt_ids"] for r in served_records] == [list(b"hey"), [9, 8, 7]]


def test_global_limit_and_demo_mode() -> None:
    d = start_daemon("server.max_inflight=2", extra_args=["--demo"])
    try:
        deadline = time.monotonic() + 60
        while "demo request answered" not in d.log_text():
            assert time.monotonic() < deadline, d.log_text()[-2000:]
            time.sleep(0.1)
        with Client(d.endpoint) as one, Client(d.endpoint) as two, Client(d.endpoint) as watch:
            streams = [one.generate(prompt_ids=[1], **LONG), two.generate(prompt_ids=[2], **LONG)]
            while watch.stats()["inflight"] < 2:  # two sockets: `one`'s request may land after `two`'s next
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(Overloaded, match="requests in flight"):
                two.generate(prompt_ids=[3], **LONG).result()
            for stream in streams:
                stream.abort()
                assert stream.result().finish_reason == "abort"
    finally:
        assert d.stop() == 0


def test_sigterm_drains_in_flight_requests_then_exits_0() -> None:
    d = start_daemon("server.drain_timeout_s=60", env={"WATCHDOG_USEC": "2000000"})  # WATCHDOG=1 every second
    try:
        with Client(d.endpoint) as client:
            streams = [client.generate(prompt_ids=[3, 4, 5], max_tokens=150, temperature=0.0, ignore_eos=True)
                       for _ in range(3)]  # fmt: skip
            next(iter(streams[0]))
            d.read_notifications()  # empty the datagram queue so that STOPPING=1 finds room
            d.proc.send_signal(signal.SIGTERM)
            d.wait_for("STOPPING=1", 10)
            with pytest.raises(ServerError, match="draining"):
                client.generate(prompt_ids=[1], max_tokens=2).result()
            for stream in streams:
                assert stream.result().finish_reason == "length" and len(stream.finished.token_ids) == 150
        assert d.proc.wait(60) == 0
        assert "WATCHDOG=1" in d.read_notifications()
    finally:
        d.stop(5)


def test_drain_budget_aborts_the_rest_with_an_error() -> None:
    d = start_daemon("server.drain_timeout_s=0.5")
    try:
        with Client(d.endpoint) as client:
            stream = client.generate(prompt_ids=[3, 4, 5], **LONG)
            next(iter(stream))
            d.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ServerError, match="aborted"):
                stream.result()
        assert d.proc.wait(30) == 0
    finally:
        d.stop(5)


def test_a_stuck_step_fails_its_requests_and_exits_1() -> None:
    from dcpd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"engine.step_timeout_s = -1.0: must be >= 0 \(0: never\)"):
        load_config(overrides=["engine.step_timeout_s=-1.0"])
    # 0.05 s is "stuck" for this test: the first step, 8,192 prompt tokens, takes far longer here
    d = start_daemon("engine.step_timeout_s=0.05")
    try:
        with Client(d.endpoint, timeout=60) as client:
            prompts = [[(7 * i + j) % 250 + 3 for j in range(2000)] for i in range(6)]
            streams = [client.generate(prompt_ids=prompt, max_tokens=4) for prompt in prompts]
            for stream in streams:
                with pytest.raises(ServerError, match="engine step is stuck") as info:
                    stream.result()
                assert info.value.code == "internal"
        assert d.proc.wait(30) == 1
        assert "engine step stuck; exiting" in d.log_text()
        assert "STATUS=engine step stuck; exiting" in d.read_notifications()
    finally:
        d.stop(5)


STUCK_AT_EXIT = """
import asyncio, sys, time
from dcpd.config import load_config
from dcpd.model.default import build_default_model
from dcpd.server.daemon import EngineService

async def main() -> None:
    worker = EngineService(load_config(overrides=[f"engine.step_timeout_s={sys.argv[1]}"]), build_default_model())
    fast = await worker.run_in_step_thread(sum, [1, 2])  # a call that returns: nothing to wait for
    task = asyncio.create_task(worker.run_in_step_thread(time.sleep, 60))  # one that does not
    await asyncio.sleep(0.2)
    task.cancel()  # the loop stops awaiting it; the thread still runs it
    print(fast, round(worker.running_s(), 1), flush=True)
    worker.close(exit_code=3)
    print("not reached", flush=True)

asyncio.run(main())
"""


def test_a_step_still_running_at_exit_is_waited_for_up_to_the_timeout_then_the_process_exits() -> None:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK_AT_EXIT, "1.0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines()[0] == "3 0.2" and "not reached" not in proc.stdout
    assert "engine step still running at exit" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 30  # not the 60 s the stuck call would take


def dcpd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcpd.cli", *args], capture_output=True, text=True, timeout=120)


def test_bad_config_exits_78_with_one_line(tmp_path) -> None:
    proc = dcpd("serve", "--set", "server.bogus=1")
    assert proc.returncode == 78
    assert proc.stderr.strip().count("\n") == 0 and "unknown field `bogus`" in proc.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[engine]\nmax_batch_size = "lots"\n')
    proc = dcpd("check-config", str(bad))
    assert proc.returncode == 78 and "engine.max_batch_size" in proc.stderr
    proc = dcpd("serve", "--config", str(tmp_path / "missing.toml"))
    assert proc.returncode == 78 and "file not found" in proc.stderr
    proc = dcpd("serve", "--model", str(tmp_path / "no-model"), "--set", "metrics.enabled=false")
    assert proc.returncode == 78 and "does not exist" in proc.stderr


@pytest.mark.parametrize("value", [-1, 20])
def test_a_push_niceness_outside_0_to_19_is_refused(value: int) -> None:
    from dcpd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"disagg.push_nice = {value}: must be in \[0, 19\]"):
        load_config(None, [f"disagg.push_nice={value}"])


def test_a_negative_peer_return_grace_is_refused() -> None:
    from dcpd.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"disagg.peer_return_grace_s = -1.0: must be >= 0"):
        load_config(None, ["disagg.peer_return_grace_s=-1.0"])


@pytest.mark.parametrize("name", ["dcpd", "router", "prefill", "decode"])
def test_shipped_configs_are_valid(name: str) -> None:
    proc = dcpd("check-config", f"config/{name}.toml")
    assert proc.returncode == 0, proc.stderr
    from dcpd.config import load_config

    assert load_config(f"config/{name}.toml").server.role == ("unified" if name == "dcpd" else name)


def test_documented_config_lists_every_key_with_its_default() -> None:
    import tomllib

    import msgspec

    from dcpd.config import Config

    documented = tomllib.loads(open("config/dcpd.toml").read())
    defaults = msgspec.to_builtins(Config())
    assert documented == defaults
