"""The systemd unit: required directives, and `systemd-analyze verify` where systemd is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "dcpd@.service"


def directives() -> dict[str, str]:
    found = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key.strip()] = value.strip()
    return found


def test_unit_has_the_service_contract() -> None:
    d = directives()
    assert d["Type"] == "notify" and d["KillMode"] == "mixed" and d["RestartPreventExitStatus"] == "78"
    assert d["WatchdogSec"] == "30s" and d["ExecStart"].endswith("serve --config /etc/dcpd/%i.toml")
    assert int(d["TimeoutStopSec"].rstrip("s")) > 30  # above the default drain budget
    assert "PrivateDevices" not in d  # GPUs stay reachable


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    dcpd = shutil.which("dcpd")
    assert dcpd, "the dcpd console script must be installed"
    text = UNIT.read_text().replace("/usr/local/bin/dcpd", dcpd)  # verify checks that ExecStart exists
    (tmp_path / "dcpd@.service").write_text(text)
    instance = tmp_path / "dcpd@unified.service"
    instance.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
