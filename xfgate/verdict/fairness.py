"""One domain's flood is paid by that domain: its packet thread yields the CPU to the guests.

A blocked owner flooding new connections sends every SYN through its domain's queue, and the
gate's thread judging them (~100 us of Python each, thousands a second) takes CPU that the other
guests' vCPUs need on the same cores: measured on this 2-core host, a second domain's httperf
connections (accepted in the kernel, never queued) took 1.2-1.9x as long with the gate as without
it under the first domain's flood. A packet thread that used more than `busy` of a core over the
last `window`, most of its packets drops (`drop_share`: a blocked owner's flood, not a busy good
service, whose accepted new flows are never slowed by this), is *flooding* until the flood ends:

- it runs at nice `nice`: the scheduler serves the guests' vCPUs first when the cores are
  contended;
- it uses at most `ceiling` (half) of a core: in the rest of each `period` it holds no GIL,
  so the gate's control thread, listener keeper and other domains' threads are never starved;
- while another guest of the gate is active (`others_busy`: the CPU time plus run-queue wait
  of the gate's other domains' QEMU threads, from /proc/PID/task/*/schedstat, over
  `others_active` of a core; under half of it ends it), it uses at most `cap` of a core.

Nice alone only orders who runs: an always-runnable niced thread still took ~10 % of a contended
core and sat in every wakeup's way; the other guests' run-queue wait alone stayed under 0.1 s a
second while their connections were 1.2x slower, so the cap follows their activity. While the
thread waits, the flooded domain's packets wait in its own queue, and a full queue drops in the
kernel (fail-closed: a good owner's SYN is sent again; good listeners' connections never queue,
they are granted in the kernel). Capped, the thread judges ~450 packets a second, far fewer than
a flood sends: the flooded domain's other users' new outgoing connections then wait (13-20 s
measured), so the cap is paid only while it protects someone: with no other guest active (or
none known: a one-domain gate) the thread keeps judging at its ceiling.

The flood ends when a window passes in which the thread never had to wait for its budget and its
share fell under `calm`. The thread's share is its own CPU clock (`time.thread_time`); the drops
are the engine's counters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BUSY_SHARE = 0.25  # of one core, over WINDOW: a flood (the lab's is ~0.4-0.6 of a core)
CALM_SHARE = 0.10
WINDOW = 1.0  # seconds
DROP_SHARE = 0.5  # of the window's packets: a flood of a blocked owner's packets
FLOOD_NICE = 10  # CFS weight 110 against a vCPU's 1024
FLOOD_CPU = 0.05  # of one core: what a flooding packet thread may use (~450 verdicts/s)
PERIOD = 0.1  # seconds: the budget's granularity (a wait is never longer)
# Another guest is active above this share of a core (its QEMU threads' CPU time plus run-queue
# wait): on this 2-core lab an idle TCG guest uses ~0.013, one answering httperf at 30 conn/s
# 0.16, at 150 conn/s 0.5.
OTHERS_ACTIVE = 0.10
# A flooding thread's share of a core when no other guest is active: half of each period it
# holds no GIL, so the gate's control thread, listener keeper and other domains' threads run (at
# a full core a flood made `status` take 1.6 s in one red-team run of three); enough to keep the
# flooded domain's other users' new connections going (one out in 0.2-1.8 s during that flood).
FLOOD_CEILING = 0.5


class Stopping(Exception):
    """Raised out of a budget wait when the thread is told to stop: ends the queue's drain."""


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def set_thread_nice(value: int) -> None:
    """The calling thread's nice value (Linux: setpriority on its thread id)."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)


@dataclass
class CpuShare:
    """Called by a packet thread after each verdict (`after_packet`) and after each drain of its
    queue (`after_serve`)."""

    name: str
    nice: int = FLOOD_NICE
    cap: float = FLOOD_CPU  # 0: no cap
    ceiling: float = FLOOD_CEILING  # flooding with no other guest active (1: none)
    busy: float = BUSY_SHARE
    calm: float = CALM_SHARE
    window: float = WINDOW
    period: float = PERIOD
    drop_share: float = DROP_SHARE
    # (packets judged, of them dropped) so far: the engine's counters
    verdicts: Callable[[], tuple[int, int]] = lambda: (0, 0)
    clock: Callable[[], float] = time.monotonic
    cpu_clock: Callable[[], float] = time.thread_time
    set_nice: Callable[[int], None] = set_thread_nice
    # Waits out the rest of a period; True: the thread is told to stop (its stop event's wait).
    wait: Callable[[float], bool] = lambda seconds: _sleep(seconds)
    # The other guests' CPU time and run-queue wait so far, seconds; None: no other guest known.
    others_busy: Callable[[], float | None] = lambda: None
    others_active: float = OTHERS_ACTIVE
    flooding: bool = False
    capped: bool = False  # flooding while another guest is active
    times_capped: int = 0
    niced: bool = False
    times_niced: int = 0
    throttled: float = 0.0  # seconds spent waiting for the budget
    times_throttled: int = 0
    disabled: str = ""  # why the nice stopped (the nice value could not be set)
    _start: float = field(default=-1.0, repr=False)
    _cpu: float = field(default=0.0, repr=False)
    _verdicts: tuple[int, int] = field(default=(0, 0), repr=False)
    _period_start: float = field(default=-1.0, repr=False)
    _period_cpu: float = field(default=0.0, repr=False)
    _waited: bool = field(default=False, repr=False)  # in the current window
    _others: float | None = field(default=None, repr=False)  # others_busy at the window's start

    @property
    def active(self) -> bool:
        return self.nice > 0 or self.cap > 0

    def after_serve(self) -> None:
        if self.active:
            self._window(self.clock())

    def after_packet(self) -> None:
        """While flooding: once this period's budget is spent, wait for the next period."""
        if not self.active:
            return
        now = self.clock()
        self._window(now)  # here too: under a flood a drain may not end for a long time
        limit = self.cap if self.capped else self.ceiling
        if not self.flooding or not 0 < limit < 1:
            return
        cpu = self.cpu_clock()
        if self._period_start < 0 or now - self._period_start >= self.period:
            self._period_start, self._period_cpu = now, cpu
            return
        if cpu - self._period_cpu < limit * self.period:
            return
        rest = self._period_start + self.period - now
        stopping = self.wait(rest)
        self.throttled += rest
        self.times_throttled += 1
        self._waited = True
        self._period_start, self._period_cpu = self.clock(), self.cpu_clock()
        if stopping:
            raise Stopping(self.name)

    def _window(self, now: float) -> None:
        if self._start < 0:
            self._start, self._cpu, self._verdicts = now, self.cpu_clock(), self.verdicts()
            return
        elapsed = now - self._start
        if elapsed < self.window:
            return
        cpu, verdicts = self.cpu_clock(), self.verdicts()
        share = (cpu - self._cpu) / elapsed
        packets, drops = (a - b for a, b in zip(verdicts, self._verdicts, strict=True))
        waited, self._waited = self._waited, False
        self._start, self._cpu, self._verdicts = now, cpu, verdicts
        if not self.flooding and share > self.busy and drops > self.drop_share * packets:
            self._flood(True, share)
        elif self.flooding and share < self.calm and not waited:
            self._flood(False, share)
        self._others_active(elapsed)

    def _others_active(self, elapsed: float) -> None:
        """Capped while flooding and another guest was active in the last window (from the
        window the flood is found in: capped until measured)."""
        others, before = (self.others_busy() if self.flooding else None), self._others
        self._others = others
        if not self.flooding or self.cap <= 0 or others is None:
            self._cap(False, -1.0)
        elif before is None:
            self._cap(True, -1.0)
        else:
            busy = (others - before) / elapsed
            self._cap(busy > (self.others_active / (2 if self.capped else 1)), busy)

    def _cap(self, on: bool, busy: float) -> None:
        if on == self.capped:
            return
        self.capped = on
        self._period_start = -1.0
        self.times_capped += on
        if busy < 0 and on:
            log.info(
                "%s: at most %.0f %% of a core until the other guests are measured",
                self.name,
                100 * self.cap,
            )
        elif busy >= 0:
            log.info(
                "%s: the other guests used %.2f of a core (CPU and run-queue wait): %s",
                self.name,
                busy,
                f"at most {100 * self.cap:.0f} % of a core" if on else "no cap",
            )

    def _flood(self, on: bool, share: float) -> None:
        self.flooding = on
        log.info(
            "%s used %.0f %% of a core over the last %.1f s%s",
            self.name,
            100 * share,
            self.window,
            f", mostly on drops: flooding (nice {self.nice}; at most {100 * self.cap:.0f} % of"
            " a core while another guest is active)"
            if on
            else ": the flood is over",
        )
        if self.nice > 0 and not self.disabled:
            self._set_nice(self.nice if on else 0)

    def _set_nice(self, value: int) -> None:
        try:
            self.set_nice(value)
        except OSError as e:
            self.disabled = f"cannot set nice {value}: {e}"
            log.warning("%s: %s (the CPU cap still applies)", self.name, self.disabled)
            return
        self.niced = value > 0
        self.times_niced += value > 0

    def stats(self) -> dict[str, object]:
        return {
            "flooding": self.flooding,
            "capped": self.capped,
            "times_capped": self.times_capped,
            "niced": self.niced,
            "times_niced": self.times_niced,
            "cap": self.cap,
            "throttled_s": round(self.throttled, 3),
            "times_throttled": self.times_throttled,
            "cpu_s": round(self._cpu, 4),  # the thread's CPU clock at its last window
            "disabled": self.disabled,
        }


def cpu_and_wait(pids: Callable[[], list[int]]) -> float | None:
    """Seconds the threads of `pids()` have run plus waited on a run queue (schedstat's first two
    fields, ns, of every task's /proc/PID/task/TID/schedstat; CONFIG_SCHED_INFO, Debian's
    kernels have it); None: no pid, or none readable."""
    total, seen = 0, False
    for pid in pids():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    ran, waited = f.read().split()[:2]
                total += int(ran) + int(waited)
                seen = True
            except (OSError, ValueError):
                continue
    return total / 1e9 if seen else None
