"""CPU placement for a benchmark: the gate on its own CPUs, the workload (the lab's QEMUs, httperf,
the bench itself) on the others, as a hosting host runs its infrastructure (Xen's dom0 on
dedicated, pinned vCPUs; a systemd unit's `CPUAffinity=`). On this 2-core host that separates
what the gate adds to a guest's traffic (a queue round trip, its own latency) from what it takes
from the guests' TCG vCPUs by sharing their cores.

Affinity is per thread in Linux: every thread of a process is placed (`/proc/PID/task`), and
what the bench starts afterwards inherits the calling thread's affinity. Everything placed is
put back on the way out.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator
from contextlib import contextmanager

from xfgate_lab.lab import read_state
from xfgate_lab.layout import layout_from_env

log = logging.getLogger(__name__)


def parse_cpus(text: str) -> frozenset[int]:
    """`"1"`, `"0,1"` or `"2-3"` as a set of CPU numbers this host has."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise ValueError(f"CPU list {text!r}: expected numbers and ranges like 1 or 2-3")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    online = os.sched_getaffinity(0)
    if not cpus or not cpus <= online:
        raise ValueError(f"CPU list {text!r}: this process may run on {sorted(online)} only")
    if cpus == online:
        raise ValueError(f"CPU list {text!r} leaves no CPU for the workload")
    return frozenset(cpus)


def threads_of(pid: int) -> list[int]:
    """The thread ids of `pid` now (empty if it is gone)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def place(pid: int, cpus: Collection[int]) -> dict[int, set[int]]:
    """Every thread of `pid` onto `cpus`; returns each placed thread's previous affinity."""
    before: dict[int, set[int]] = {}
    for tid in threads_of(pid):
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread exited meanwhile
            continue
    return before


def restore(before: dict[int, set[int]]) -> None:
    for tid, cpus in before.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue


@contextmanager
def workload_on(cpus: Collection[int], pids: Collection[int]) -> Iterator[None]:
    """The calling thread (so what it starts from now on) and every thread of `pids` on `cpus`
    for the duration, put back after."""
    mine = os.sched_getaffinity(0)
    placed: dict[int, set[int]] = {}
    try:
        os.sched_setaffinity(0, cpus)
        for pid in pids:
            placed.update(place(pid, cpus))
        log.info("workload on CPUs %s: %d threads of %s", sorted(cpus), len(placed), list(pids))
        yield
    finally:
        restore(placed)
        os.sched_setaffinity(0, mine)


def lab_qemu_pids() -> list[int]:
    """The QEMU pids of the current lab (`xfgate-lab up` records them in its state)."""
    state = read_state(layout_from_env())
    return [p for p in (state.qemu_pids.values() if state else ()) if p > 0]
