"""`python -m bench.ps_bench`: `xfgate ps --json` answered by a running gate beside `xfgate ps
--json --walk` (and the table through the gate), end to end (a new process each, as an operator
types it), on the current lab's domain, in one session, with the load averages (issue 10's
`ps` target: <= 0.3 s on the crowd).

The gate is `xfgate run --domain D --block-uid 1001` (the lab's usual policy) with a private
run directory; its first answer decodes every sock (its memo is empty: `ps_gate_first_s`), the
timed ones after it are what an operator meets on a gate that answered before. Prints one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.vmi_bench import summary_ms
from xfgate_lab.gate_process import gate_process
from xfgate_lab.layout import cache_dir_from_env, domains_file_from_env

SETTLE_S = 4.0  # the gate's first walk and refreshes, before the first request


def _ps(
    domain: int, env: Mapping[str, str], *extra: str, table: bool = False
) -> tuple[float, dict[str, Any]]:
    """One `xfgate ps --json` (the table with `table`: then no document) and its time."""
    argv = [sys.executable, "-m", "xfgate.cli", "--domains-file", str(domains_file_from_env())]
    argv += ["--cache-dir", str(cache_dir_from_env()), "ps", "--domain", str(domain)]
    argv += [] if table else ["--json"]
    t = time.perf_counter()
    done = subprocess.run(
        [*argv, *extra], capture_output=True, timeout=120, check=False, env=dict(env)
    )
    elapsed = time.perf_counter() - t
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr.decode(errors="replace")[-500:])
    doc: dict[str, Any] = {} if table else json.loads(done.stdout)
    return elapsed, doc


def measure(domain: int, runs: int, out_dir: Path) -> dict[str, Any]:
    env = {**os.environ, "XFGATE_RUN_DIR": str(out_dir / "run")}
    figures: dict[str, Any] = {"loadavg_before": os.getloadavg()}
    walk: list[float] = []
    for _ in range(runs):
        elapsed, doc = _ps(domain, env, "--walk")
        assert doc.get("source") == "walk", doc.get("source")
        walk.append(elapsed)
    figures["ps_walk"] = summary_ms(walk)
    gate_args = ["--domain", str(domain), "--block-uid", "1001"]
    with gate_process(gate_args, out_dir / "gate.out", env=env):
        time.sleep(SETTLE_S)
        first, doc = _ps(domain, env)
        figures["ps_gate_first_s"] = round(first, 3)
        samples: list[float] = []
        parts: dict[str, list[float]] = {"walk_ms": [], "check_ms": []}
        for _ in range(runs):
            elapsed, doc = _ps(domain, env)
            if doc.get("source") != "gate":
                return {**figures, "error": f"answered by {doc.get('source')!r}"}
            samples.append(elapsed)
            counts = doc["gate"]["counts"]
            for key, values in parts.items():
                values.append(float(counts.get(key, 0.0)) / 1000)
        figures["ps_gate"] = summary_ms(samples)
        figures["ps_gate_table"] = summary_ms(
            [_ps(domain, env, table=True)[0] for _ in range(runs)]
        )
        figures["ps_gate_parts"] = {k: summary_ms(v) for k, v in parts.items()}
        figures["ps_gate_complete"] = bool(doc["gate"]["complete"])
        figures["ps_processes_sockets"] = [len(doc["processes"]), len(doc["sockets"])]
    figures["loadavg_after"] = os.getloadavg()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10, help="timed runs of each")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="xfgate-ps-bench-") as tmp:
        print(json.dumps(measure(args.domain, args.runs, Path(tmp)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
