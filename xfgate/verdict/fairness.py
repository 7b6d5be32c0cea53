"""One domain's flood is paid by that domain: its packet thread yields the CPU to the guests.

A blocked owner flooding new connections sends every SYN through its domain's queue, and the
gate's thread judging them (~120 us of Python each, thousands a second) takes CPU that the other
guests' vCPUs need on the same cores: measured on this 2-core host, a second domain's httperf
connections (accepted in the kernel, never queued) took 1.2-1.9x as long with the gate as without
it under the first domain's flood. A packet thread that used more than `busy` of a core over the
last `window`, most of its packets drops (`drop_share`: a blocked owner's flood, not a busy good
service, whose accepted new flows are never slowed by this), runs at nice `nice` until its share
falls under `calm`: the scheduler then serves the guests' vCPUs first and the flooded domain's
new flows wait in its own queue (a full queue drops, fail-closed: a good owner's SYN is sent
again). Nice only orders who runs when the CPU is contended; an idle host still gives the thread
all it asks. The thread's share is its own CPU clock (`time.thread_time`), read by the thread
itself after each drain of its queue; the drops are the engine's counters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BUSY_SHARE = 0.25  # of one core, over WINDOW: a flood (the lab's is ~0.4 of a core)
CALM_SHARE = 0.10
WINDOW = 1.0  # seconds
DROP_SHARE = 0.5  # of the window's packets: a flood of a blocked owner's packets
FLOOD_NICE = 10  # CFS weight 110 against a vCPU's 1024: ~10 % of a contended core


def set_thread_nice(value: int) -> None:
    """The calling thread's nice value (Linux: setpriority on its thread id)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)


@dataclass
class CpuShare:
    """Called by a packet thread after each drain of its queue (`after_serve`)."""

    name: str
    nice: int = FLOOD_NICE
    busy: float = BUSY_SHARE
    calm: float = CALM_SHARE
    window: float = WINDOW
    drop_share: float = DROP_SHARE
    # (packets judged, of them dropped) so far: the engine's counters
    verdicts: Callable[[], tuple[int, int]] = lambda: (0, 0)
    clock: Callable[[], float] = time.monotonic
    cpu_clock: Callable[[], float] = time.thread_time
    set_nice: Callable[[int], None] = set_thread_nice
    niced: bool = False
    times_niced: int = 0
    disabled: str = ""  # why it stopped (the nice value could not be set)
    _start: float = field(default=-1.0, repr=False)
    _cpu: float = field(default=0.0, repr=False)
    _verdicts: tuple[int, int] = field(default=(0, 0), repr=False)

    def after_serve(self) -> None:
        if self.nice <= 0 or self.disabled:
            return
        now = self.clock()
        if self._start < 0:
            self._start, self._cpu, self._verdicts = now, self.cpu_clock(), self.verdicts()
            return
        elapsed = now - self._start
        if elapsed < self.window:
            return
        cpu, verdicts = self.cpu_clock(), self.verdicts()
        share = (cpu - self._cpu) / elapsed
        packets, drops = (a - b for a, b in zip(verdicts, self._verdicts, strict=True))
        self._start, self._cpu, self._verdicts = now, cpu, verdicts
        if not self.niced and share > self.busy and drops > self.drop_share * packets:
            self._set(self.nice, share)
        elif self.niced and share < self.calm:
            self._set(0, share)

    def _set(self, value: int, share: float) -> None:
        try:
            self.set_nice(value)
        except OSError as e:
            self.disabled = f"cannot set nice {value}: {e}"
            log.warning("%s: %s (flood fairness off)", self.name, self.disabled)
            return
        self.niced = value > 0
        self.times_niced += value > 0
        log.info(
            "%s used %.0f %% of a core over the last %.1f s: nice %d%s",
            self.name,
            100 * share,
            self.window,
            value,
            " (mostly drops: the guests' vCPUs first while it floods)" if value else "",
        )

    def stats(self) -> dict[str, object]:
        return {"niced": self.niced, "times_niced": self.times_niced, "disabled": self.disabled}
