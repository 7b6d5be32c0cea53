"""Start and stop an `xfgate run` process for a benchmark configuration, by its pid."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from xfgate_lab.gate_process import gate_process

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


def gate_run_args(domain: int, config: str, block: Sequence[str]) -> list[str] | None:
    """`xfgate run` arguments of a configuration; None for the baseline (no gate)."""
    extra = CONFIGS[config]
    if extra is None:
        return None
    return ["--domain", str(domain), *block, *extra]


@contextmanager
def running_gate(
    domain: int, config: str, block: Sequence[str], log_path: Path, ready_timeout: float = 60.0
) -> Iterator[int | None]:
    """Yields the gate's pid once it is ready (None for the baseline); always stops it."""
    run_args = gate_run_args(domain, config, block)
    if run_args is None:
        yield None
        return
    with gate_process(run_args, log_path, ready_timeout) as proc:
        yield proc.pid
