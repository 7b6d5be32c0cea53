"""The systemd unit shipped in packaging/systemd: what it promises, that its command line parses,
and that `systemd-analyze verify` finds nothing to say about it (where systemd-analyze exists)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from xfgate.cli import build_parser

UNIT = Path(__file__).parent.parent / "packaging" / "systemd" / "xfgate.service"


def settings(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_is_a_notify_service_with_watchdog_and_restart() -> None:
    s = settings(UNIT.read_text())
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    assert int(s["WatchdogSec"]) > 0 and s["ExecReload"].endswith("-HUP $MAINPID")


def test_unit_command_line_is_one_xfgate_accepts() -> None:
    argv = shlex.split(settings(UNIT.read_text())["ExecStart"])
    assert argv[:2] == ["/usr/bin/env", "xfgate"]
    args = build_parser(env={}).parse_args(argv[2:])
    assert args.command == "serve" and args.metrics == "127.0.0.1:9469"


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    p = verify(UNIT)
    assert p.returncode == 0 and (p.stdout + p.stderr).strip() == "", p.stdout + p.stderr
    broken = tmp_path / "xfgate.service"  # the check can fail: verify warns and exits 0
    broken.write_text(UNIT.read_text().replace("WatchdogSec=30", "WatchdogSec=soon"))
    p = verify(broken)
    assert "WatchdogSec" in p.stdout + p.stderr or "sec value" in p.stdout + p.stderr
