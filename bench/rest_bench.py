"""The gate's CPU at rest on a lab guest, printed as JSON.

    python -m bench.rest_bench --domain 1 [--seconds 30] [--warmup 10]

Starts `xfgate run --domain D --block-uid 1001` (queue mode), lets it warm up, then reads its
CPU time (utime + stime of every thread, /proc/PID/stat) over `seconds`: percent of one core.
The lab's workload keeps running (its attacker opens ~2 flows/s), so "rest" here means no
flows beyond that. Bounded: warmup + seconds, then the gate is stopped by its pid.
`refresh_work`: what the gate's refresher did in the measured window (`xfgate status` before
and after: full walks, refreshes, quiet ones, grant renewals, the keeper's rounds and its
netlink sends and requests, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.gate import running_gate


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def refresh_counters(domain: int) -> dict[str, float]:
    """The numeric counters of `xfgate status`'s refresh section (crosscheck flattened);
    {} when status does not answer."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "xfgate.cli", "status", "--domain", str(domain), "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        refresh = json.loads(out)[0].get("refresh", {})
    except (subprocess.SubprocessError, ValueError, IndexError, AttributeError):
        return {}
    keeper = {f"keeper_{k}": v for k, v in (refresh.get("keeper") or {}).items()}
    keeper |= {f"blocked_link_{k}": v for k, v in (refresh.get("blocked_link") or {}).items()}
    flat = {**refresh, **refresh.get("crosscheck", {}), **keeper}
    return {
        k: v for k, v in flat.items() if isinstance(v, int | float) and not k.startswith("last")
    }


def run(domain: int, seconds: float, warmup: float) -> dict[str, Any]:
    out: dict[str, Any] = {"domain": domain, "seconds": seconds, "loadavg": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="xfgate-rest-") as tmp:
        log_path = Path(tmp) / "gate.log"
        with running_gate(domain, "gate", ("--block-uid", "1001"), log_path) as pid:
            assert pid is not None
            time.sleep(warmup)
            before = refresh_counters(domain)
            c0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            c1, t1 = cpu_seconds(pid), time.monotonic()
            after = refresh_counters(domain)
        out["gate_cpu_percent_of_one_core"] = round(100 * (c1 - c0) / (t1 - t0), 2)
        out["refresh_work"] = {k: round(v - before.get(k, 0), 2) for k, v in after.items()}
        out["gate_log_tail"] = log_path.read_text(errors="replace").splitlines()[-5:]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=10.0)
    args = parser.parse_args(argv)
    seconds = max(1.0, min(args.seconds, 600.0))
    print(json.dumps(run(args.domain, seconds, max(0.0, min(args.warmup, 120.0))), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
