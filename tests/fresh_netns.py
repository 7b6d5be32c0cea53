"""Run a test module's probe in a fresh, empty network namespace (`unshare -n`) and read the
JSON it prints: real netlink, ipsets and nftables with nothing of the host around."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def probe_in_fresh_netns(module: str) -> dict[str, Any]:
    """`python -m module` under `unshare -n`; its stdout is one JSON document."""
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", module],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result
