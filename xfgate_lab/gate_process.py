"""A gate as a child process, for the demo, the benchmarks and the tests: started, awaited until
it says `gate ready`, and always stopped by its pid (SIGKILL and `xfgate cleanup` if it will not
go). The one copy of that loop.

With `owners_json` the child is the harness's gate (`xfgate-lab gate --owners-json FILE`: the
product's runner fed a static owner table); without it, the product's `xfgate run`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from xfgate_lab.errors import LabError

XFGATE = (sys.executable, "-m", "xfgate.cli")
XFGATE_LAB = (sys.executable, "-m", "xfgate_lab.cli")
READY_LINE = "gate ready"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def gate_argv(run_args: Sequence[str], owners_json: Path | None = None) -> list[str]:
    """The command line of a gate with `xfgate run` arguments `run_args`."""
    if owners_json is None:
        return [*XFGATE, "run", *run_args]
    return [*XFGATE_LAB, "gate", "--owners-json", str(owners_json), *run_args]


def run_domains(run_args: Sequence[str]) -> list[str]:
    """The --domain values of `xfgate run` arguments (ids, names or UUIDs)."""
    return [run_args[i + 1] for i, a in enumerate(run_args[:-1]) if a == "--domain"]


@dataclass
class GateProcess:
    """A started gate: its process, the file holding its stdout and stderr, its domains."""

    proc: subprocess.Popen[bytes]
    output_path: Path
    domains: tuple[str, ...]
    env: Mapping[str, str] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Returns once the gate printed its ready line; raises LabError (with the tail of its
        output) if it exits or stays silent for `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while READY_LINE not in (text := self.output()):
            if self.proc.poll() is not None:
                raise LabError(f"the gate exited with {self.proc.returncode}: {text[-800:]}")
            if time.monotonic() > deadline:
                raise LabError(f"the gate is not ready after {timeout:.0f} s: {text[-800:]}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGINT, timeout: float = STOP_TIMEOUT) -> int:
        """Sends `sig` (SIGINT/SIGTERM: the gate exits and leaves its enforcement in the kernel
        unless it runs with --release-on-exit) and returns the exit status. A gate that will not
        go is killed and its domains released by `xfgate cleanup`."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
                self.cleanup()
        return self.proc.returncode

    def cleanup(self) -> None:
        for d in self.domains:
            subprocess.run(
                [*XFGATE, "cleanup", "--domain", d],
                capture_output=True,
                env=None if self.env is None else dict(self.env),
                timeout=60,
            )


def start_gate(
    run_args: Sequence[str],
    output_path: Path,
    *,
    owners_json: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> GateProcess:
    """Starts a gate with `xfgate run` arguments `run_args`; does not wait for it."""
    with output_path.open("wb") as out:
        proc = subprocess.Popen(
            gate_argv(run_args, owners_json),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    return GateProcess(proc, output_path, tuple(run_domains(run_args)), env)


@contextmanager
def gate_process(
    run_args: Sequence[str],
    output_path: Path,
    ready_timeout: float = READY_TIMEOUT,
    *,
    owners_json: Path | None = None,
    env: Mapping[str, str] | None = None,
    release: bool = True,
) -> Iterator[GateProcess]:
    """A gate, yielded once it is ready, stopped by its pid on the way out. A stopped gate
    leaves its domains' enforcement in the kernel (fail-closed): with `release` (the default
    for the benchmarks and tests that share a lab) `xfgate cleanup` then releases them, so
    the next user of the lab finds its guests reachable."""
    gate = start_gate(run_args, output_path, owners_json=owners_json, env=env)
    try:
        gate.wait_ready(ready_timeout)
        yield gate
    finally:
        gate.stop()
        if release:
            gate.cleanup()
