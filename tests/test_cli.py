"""The `dcpd` command line, run as a real subprocess."""

from __future__ import annotations

import json
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
