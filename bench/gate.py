"""Start and stop an `xfgate run` process for a benchmark configuration, by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from xfgate.errors import XfgateError

XFGATE = (sys.executable, "-m", "xfgate.cli")

# Configuration name -> `xfgate run` arguments (None: no gate at all, the baseline).
CONFIGS: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "gate": ("--mode", "queue"),
    "gate-nofastpath": ("--mode", "queue", "--no-fastpath"),
    "poll-3": ("--mode", "poll", "--interval", "3"),
    "poll-5": ("--mode", "poll", "--interval", "5"),
    "poll-10": ("--mode", "poll", "--interval", "10"),
    "poll-15": ("--mode", "poll", "--interval", "15"),
}


def gate_argv(domain: int, config: str, block: Sequence[str]) -> list[str] | None:
    extra = CONFIGS[config]
    if extra is None:
        return None
    return [*XFGATE, "run", "--domain", str(domain), *block, *extra]


@contextmanager
def running_gate(
    domain: int, config: str, block: Sequence[str], log_path: Path, ready_timeout: float = 60.0
) -> Iterator[int | None]:
    """Yields the gate's pid once it printed `gate ready` (None for the baseline). Always stops
    it: SIGINT (it removes its rules), then SIGKILL and `xfgate cleanup` if it would not go."""
    argv = gate_argv(domain, config, block)
    if argv is None:
        yield None
        return
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            text = log_path.read_text(errors="replace")
            if "gate ready" in text:
                break
            if proc.poll() is not None:
                raise XfgateError(f"gate {config} exited with {proc.returncode}: {text[-800:]}")
            if time.monotonic() > deadline:
                raise XfgateError(
                    f"gate {config} not ready after {ready_timeout:.0f} s: {text[-800:]}"
                )
            time.sleep(0.1)
        yield proc.pid
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
                subprocess.run(
                    [*XFGATE, "cleanup", "--domain", str(domain)], capture_output=True, timeout=60
                )
