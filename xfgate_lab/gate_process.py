"""`xfgate run` as a child process, for the demo and the benchmarks: started, awaited until it
says `gate ready`, and always stopped by its pid."""

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
XFGATE_LAB = (sys.executable, "-m", "xfgate_lab.cli")
READY_LINE = "gate ready"


def stop_gate(proc: subprocess.Popen[bytes], domains: Sequence[int]) -> None:
    """SIGINT (the gate removes what it installed); if it will not go, SIGKILL and
    `xfgate cleanup` of its domains so no chain, set or mark of it stays behind."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        for d in domains:
            subprocess.run(
                [*XFGATE, "cleanup", "--domain", str(d)], capture_output=True, timeout=60
            )


def _run_domains(run_args: Sequence[str]) -> list[int]:
    return [int(run_args[i + 1]) for i, a in enumerate(run_args[:-1]) if a == "--domain"]


@contextmanager
def gate_process(
    run_args: Sequence[str], log_path: Path, ready_timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """`xfgate run RUN_ARGS...`, its output in `log_path`; yields once it is ready."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*XFGATE, "run", *run_args], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout
        while READY_LINE not in (text := log_path.read_text(errors="replace")):
            if proc.poll() is not None:
                raise XfgateError(f"the gate exited with {proc.returncode}: {text[-800:]}")
            if time.monotonic() > deadline:
                raise XfgateError(
                    f"the gate is not ready after {ready_timeout:.0f} s: {text[-800:]}"
                )
            time.sleep(0.1)
        yield proc
    finally:
        stop_gate(proc, _run_domains(run_args))
