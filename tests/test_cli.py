"""The `dcpd` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_demo_runs_and_checks_itself() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dcpd.cli", "demo", "--json"], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True
    for run in result["runs"]:
        phases = {step["phase"] for step in run["steps"]}
        assert phases == {"prefill", "mixed", "decode"}
        assert run["max_abs_err"] < 1e-4 and run["blocks_leaked"] == 0
        assert all(step["tokens"] <= 64 for step in run["steps"])
    assert [run["dcp_size"] for run in result["runs"]] == [1, 2]


def test_unknown_command_is_an_error() -> None:
    proc = subprocess.run([sys.executable, "-m", "dcpd.cli", "bogus"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def dcpd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dcpd.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_run_json_one_object_per_prompt_in_input_order() -> None:
    from dcpd.engine import LLMEngine, SamplingParams
    from dcpd.model.default import build_default_model

    proc = dcpd("run", "--prompt-ids", "1,2,3", "--prompt", "hi", "--prompt-ids", "4,5", "--max-tokens", "6",
                "--temperature", "0", "--ignore-eos", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    # --prompt texts come first, then --prompt-ids, each group in the order given
    assert [r["prompt_ids"] for r in records] == [[104, 105], [1, 2, 3], [4, 5]]
    expected = LLMEngine(build_default_model()).generate(
        [r["prompt_ids"] for r in records], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )
    for record, want in zip(records, expected, strict=True):
        assert set(record) >= {"prompt_ids", "token_ids", "text", "finish_reason"}
        assert record["token_ids"] == want.token_ids and record["finish_reason"] == "length"


def test_run_with_a_checkpoint_directory(tmp_path) -> None:
    import torch

    from tests.hf_models import make_checkpoint

    hf = make_checkpoint(tmp_path, "qwen2", seed=4)
    proc = dcpd("run", "--model", str(tmp_path), "--prompt-ids", "5,6,7,8", "--max-tokens", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)["token_ids"]
    with torch.no_grad():
        ids = torch.tensor([[5, 6, 7, 8]])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert got == want[0, 4:].tolist()


def test_run_errors_are_clear() -> None:
    proc = dcpd("run", "--prompt-ids", "1,x")
    assert proc.returncode == 2 and "expected comma-separated integers" in proc.stderr
    proc = dcpd("run", "--prompt-ids", "999")
    assert proc.returncode == 1 and "outside the vocabulary" in proc.stderr
    proc = dcpd("run", "--model", "/nonexistent", "--prompt", "x")
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = dcpd("run")
    assert proc.returncode == 2 and "at least one --prompt" in proc.stderr


def test_cluster_and_role_arguments_are_checked() -> None:
    proc = dcpd("cluster", "--prefill", "0")
    assert proc.returncode == 2 and "--prefill and --decode must be >= 1" in proc.stderr
    proc = dcpd("cluster", "--set", "disagg.max_attempts=0")
    assert proc.returncode == 78 and "disagg.max_attempts = 0" in proc.stderr
    proc = dcpd("serve", "--role", "router", "--demo")
    assert proc.returncode == 2 and "--demo needs the unified role" in proc.stderr
    proc = dcpd("serve", "--role", "decode", "--set", 'disagg.kv_endpoint="udp://x"')
    assert proc.returncode == 78 and "disagg.kv_endpoint" in proc.stderr


def test_bad_values_and_unusable_resources_give_one_line_and_the_right_status(tmp_path) -> None:
    """Values that pass the types but can never work are configuration errors (78, one line naming the
    key), found before a model is loaded or a child started. Resources missing now (a CUDA device, the
    memory for the KV cache) are exit 1, one line: under systemd they are retried (driver not up yet)."""
    for args, says, status in [
        (("serve", "--set", "server.send_hwm=-5"), "server.send_hwm = -5: must be >= 0", 78),
        (("serve", "--set", "engine.threads=-1"), "engine.threads = -1: must be >= 0", 78),
        (("serve", "--set", 'model.device="tpu"'), "model.device = 'tpu': must be 'cpu', 'cuda' or 'cuda:N'", 78),
        (("serve", "--set", 'model.device="cuda:99"'), "model.device = 'cuda:99': ", 1),
        (("serve", "--frontend", "tcp://127.0.0.1:http"), "the port a number in [0, 65535]", 78),
        (("serve", "--set", "engine.kv_cache_mb=100000000"), "cannot allocate a KV cache of 100000000 MiB", 1),
        (("check-config", str(tmp_path)), "cannot read (Is a directory)", 78),
        (("cluster", "--model", "/nonexistent"), "model directory /nonexistent does not exist", 78),
        (("cluster", "--frontend", "foo"), "server.frontend = 'foo'", 78),
    ]:
        proc = dcpd(*args)
        assert proc.returncode == status and says in proc.stderr, (args, proc.returncode, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = dcpd("cluster", "--ready-timeout", "0")
    assert proc.returncode == 2 and "--ready-timeout must be > 0" in proc.stderr
    (tmp_path / "m.toml").write_text('[model]\npath = "/nonexistent"\n')  # what ExecStartPre runs
    proc = dcpd("check-config", str(tmp_path / "m.toml"))
    assert proc.returncode == 78 and "model directory /nonexistent does not exist" in proc.stderr


def test_a_second_daemon_on_a_live_ipc_address_is_refused_not_a_silent_takeover() -> None:
    """libzmq binds an ipc path by unlinking the file there: a second daemon would take the address from
    a running one, which then serves no one. It is refused (exit 1); the first keeps serving. A port
    the metrics exporter cannot bind is exit 1 with one error, not a traceback."""
    import signal
    import socket
    import tempfile

    from dcpd.client import Client

    with tempfile.TemporaryDirectory(prefix="dtk", dir="/tmp") as tmp, socket.socket() as busy:
        endpoint = f"ipc://{tmp}/f"
        serve = [sys.executable, "-m", "dcpd.cli", "serve", "--frontend", endpoint, "--set", "metrics.enabled=false"]
        first = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(endpoint, timeout=120) as client:
                assert client.health() == "serving"
                second = dcpd("serve", "--frontend", endpoint, "--set", "metrics.enabled=false")
                assert second.returncode == 1
                assert f"{endpoint}: another process is binding or bound there" in second.stdout + second.stderr
                assert client.health() == "serving"  # still the first one's address
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            third = dcpd("serve", "--frontend", f"ipc://{tmp}/g", "--set", f"metrics.port={port}")
            out = third.stdout + third.stderr
            assert third.returncode == 1 and f"cannot serve metrics on 127.0.0.1:{port}" in out, out[-2000:]
            assert "Traceback" not in out
        finally:
            first.send_signal(signal.SIGTERM)
            assert first.wait(60) == 0


def test_an_ipc_path_another_daemon_is_starting_on_is_refused_and_a_stopped_daemon_leaves_no_file() -> None:
    """Two daemons started at the same instant on one ipc path could both find nobody listening there:
    the path's lock decides. Here another process holds it (a daemon between its check and its bind):
    this one is refused (exit 1), naming the lock. A daemon that stops removes its socket file and
    its lock (libzmq leaves the socket file behind)."""
    import fcntl
    import signal
    import socket
    import tempfile

    from dcpd.client import Client

    with tempfile.TemporaryDirectory(prefix="dtl", dir="/tmp") as tmp:
        endpoint = f"ipc://{tmp}/f"
        with open(f"{tmp}/f.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held = dcpd("serve", "--frontend", endpoint, "--set", "metrics.enabled=false")
        out = held.stdout + held.stderr
        assert held.returncode == 1 and f"another process is binding or bound there ({tmp}/f.lock is locked)" in out
        assert "Traceback" not in out, out[-2000:]
        with socket.socket(socket.AF_UNIX) as other:  # a process that takes no lock listens there
            other.bind(f"{tmp}/o")
            other.listen()
            taken = dcpd("serve", "--frontend", f"ipc://{tmp}/o", "--set", "metrics.enabled=false")
        assert taken.returncode == 1 and f"ipc://{tmp}/o: another process is listening there" in taken.stdout
        os.unlink(f"{tmp}/o")
        serve = [sys.executable, "-m", "dcpd.cli", "serve", "--frontend", endpoint, "--set", "metrics.enabled=false"]
        daemon = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # the lock file the test left is free now: it is taken over
            with Client(endpoint, timeout=120) as client:
                assert client.health() == "serving"
            assert sorted(os.listdir(tmp)) == ["f", "f.lock"]
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        assert os.listdir(tmp) == []


def test_a_peer_without_a_configured_name_logs_the_name_the_router_knows_it_by() -> None:
    """Every line a decode peer logs names it, also when `disagg.peer_name` is left empty (ROLE-HOST-PID)."""
    import signal
    import socket
    import tempfile
    import threading

    with tempfile.TemporaryDirectory(prefix="dpn", dir="/tmp") as tmp:
        sets = ["metrics.enabled=false", 'logging.format="json"', f'disagg.kv_endpoint="ipc://{tmp}/kv"',
                f'disagg.router_endpoint="ipc://{tmp}/r"']  # fmt: skip
        args = ["serve", "--role", "decode", *(arg for item in sets for arg in ("--set", item))]
        proc = subprocess.Popen([sys.executable, "-m", "dcpd.cli", *args], stdout=subprocess.PIPE, text=True)
        watchdog = threading.Timer(120, proc.kill)  # a peer that never starts fails the test, not hangs it
        watchdog.start()
        try:
            serving = json.loads(proc.stdout.readline())  # its first line
        finally:
            proc.send_signal(signal.SIGINT)
            rest = proc.communicate(timeout=60)[0]
            watchdog.cancel()
    assert serving["event"] == "serving"
    name = f"decode-{socket.gethostname()}-{proc.pid}"
    lines = [serving, *(json.loads(line) for line in rest.splitlines() if line.strip())]
    assert serving["name"] == name and all(line["peer"] == name for line in lines)
