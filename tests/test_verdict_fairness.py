"""Flood fairness: a packet thread that uses over a quarter of a core on drops is reniced and
capped until it calms."""

from __future__ import annotations

import argparse
import os
import threading

import pytest

from xfgate.verdict.cli import _add_queue_arguments
from xfgate.verdict.fairness import CpuShare, Stopping, cpu_and_wait, set_thread_nice


class Clocks:
    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 5.0
        self.nices: list[int] = []
        self.packets = 0
        self.dropped = 0
        self.waits: list[float] = []
        self.stop = False
        # The other guests' CPU and run-queue wait so far (None: none known), growing by
        # `contention` seconds a second: a second guest answering 150 conn/s uses ~0.5.
        self.others: float | None = 0.0
        self.contention = 0.3

    def wait(self, seconds: float) -> bool:
        self.wall += seconds
        if self.others is not None:
            self.others += self.contention * seconds
        self.waits.append(seconds)
        return self.stop

    def share(self, **kw: object) -> CpuShare:
        return CpuShare(
            "xfgate-packets-1",
            clock=lambda: self.wall,
            cpu_clock=lambda: self.cpu,
            set_nice=self.nices.append,
            verdicts=lambda: (self.packets, self.dropped),
            wait=self.wait,
            others_busy=lambda: self.others,
            **kw,  # type: ignore[arg-type]
        )

    def run(self, share: CpuShare, seconds: float, busy: float, drops: float = 1.0) -> None:
        """`seconds` of serving at `busy` of a core (100 packets per 0.1 s, `drops` of them
        dropped), after_serve every 0.1 s."""
        for _ in range(round(seconds / 0.1)):
            self.wall += 0.1
            self.cpu += 0.1 * busy
            self.packets += 100
            self.dropped += round(100 * drops)
            share.after_serve()

    def judge(self, share: CpuShare, n: int, cost: float = 1e-4, gap: float = 0.0) -> None:
        """`n` dropped packets of `cost` CPU each, `gap` of idle wall time after each, the
        budget checked after every verdict (the queue never ran dry: no after_serve)."""
        for _ in range(n):
            self.wall += cost + gap
            self.cpu += cost
            if self.others is not None:
                self.others += self.contention * (cost + gap)
            self.packets += 1
            self.dropped += 1
            share.after_packet()


def test_a_flooding_thread_uses_at_most_its_cap_until_the_flood_ends() -> None:
    c = Clocks()
    s = c.share(cap=0.05)
    c.judge(s, 10_050)  # a queue that never runs dry: 1 s at a full core, all drops
    assert s.flooding and c.nices == [10] and c.waits == []
    wall, cpu = c.wall, c.cpu
    c.judge(s, 2_000)  # 0.2 s of CPU: at 5 % of a core it takes ~4 s
    share = (c.cpu - cpu) / (c.wall - wall)
    assert 0.045 < share <= 0.052, share
    assert all(w <= s.period for w in c.waits) and s.times_throttled == len(c.waits) >= 35
    assert s.stats()["flooding"] is True and float(s.stats()["throttled_s"]) > 3.5  # type: ignore[arg-type]
    assert s.capped and s.times_capped == 1
    c.judge(s, 300, gap=0.01)  # the flood is over: a packet every 10 ms, never a wait
    assert not s.flooding and c.nices == [10, 0] and s.times_throttled == len(c.waits)


def test_no_cap_while_no_other_guest_is_active() -> None:
    """The cap costs the flooded domain's other users their new connections (~450 verdicts a
    second against thousands of flood SYNs): paid only while it protects another guest."""
    c = Clocks()
    c.others = None  # no other guest known (a one-domain gate)
    s = c.share(cap=0.05)
    c.judge(s, 10_050)  # 1 s of a flood at a full core: found
    wall, cpu = c.wall, c.cpu
    c.judge(s, 20_000)  # 2 s of CPU more: at the ceiling, half a core, not the cap
    assert s.flooding and c.nices == [10] and not s.capped and s.times_capped == 0
    assert 0.48 < (c.cpu - cpu) / (c.wall - wall) <= 0.51 and all(w <= 0.05 for w in c.waits)
    c = Clocks()
    c.contention = 0.0  # the other guests idle: capped from the flood's first window only,
    s = c.share(cap=0.05)  # until their wait is measured
    c.judge(s, 30_000)
    capped_waits = [w for w in c.waits if w > 0.05]  # 95 ms each; at the ceiling 50 ms
    assert s.flooding and not s.capped and s.times_capped == 1 and 0.8 < sum(capped_waits) < 1.0


def test_the_cap_follows_the_other_guests_activity() -> None:
    c = Clocks()
    c.contention = 0.0
    s = c.share(cap=0.05)
    c.judge(s, 20_000)  # flooding, the other guest idle: no cap
    assert s.flooding and not s.capped
    c.contention = 0.3  # it gets busy: capped from the next window
    c.judge(s, 12_000)
    assert s.capped and c.waits
    c.contention = 0.04  # under half the threshold: the cap ends (0.08 would keep it)
    c.judge(s, 3_000)
    assert s.flooding and not s.capped and s.times_capped == 2  # the first window, then this


def test_a_capped_flood_that_goes_on_stays_flooding() -> None:
    c = Clocks()
    s = c.share(cap=0.05)
    c.judge(s, 10_050)
    c.judge(s, 5_000)  # ~10 s: every window under `calm` but each one had to wait
    assert s.flooding and c.nices == [10]


def test_a_budget_wait_ends_the_drain_when_the_thread_stops() -> None:
    c = Clocks()
    s = c.share(cap=0.05)
    c.judge(s, 10_050)
    c.stop = True
    with pytest.raises(Stopping):
        c.judge(s, 1_000)


def test_the_cap_holds_when_the_nice_cannot_be_set() -> None:
    c = Clocks()

    def refuse(value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    s = c.share(cap=0.05)
    s.set_nice = refuse
    c.judge(s, 10_050)
    c.judge(s, 1_000)
    assert s.disabled and s.flooding and not s.niced and c.waits


def test_ordinary_traffic_is_never_capped() -> None:
    c = Clocks()
    s = c.share(cap=0.05)
    c.run(s, 3.0, 0.9, drops=0.0)  # a busy good service
    c.judge(s, 0)
    assert not s.flooding and c.waits == []


def test_a_flood_is_reniced_and_calm_restores_it() -> None:
    c = Clocks()
    s = c.share()
    c.run(s, 3.0, 0.05)
    assert c.nices == [] and not s.niced  # ordinary traffic: never touched
    c.run(s, 2.0, 0.45)  # the flood: ~0.45 of a core
    assert c.nices == [10] and s.niced and s.times_niced == 1
    c.run(s, 2.0, 0.15)  # between calm and busy: stays niced (no flapping)
    assert c.nices == [10]
    c.run(s, 2.0, 0.02)
    assert c.nices == [10, 0] and not s.niced
    assert s.stats() == {
        "flooding": False,
        "capped": False,
        "times_capped": 1,  # the flood's first window, until the others' wait was measured
        "niced": False,
        "times_niced": 1,
        "cap": 0.05,
        "throttled_s": 0.0,
        "times_throttled": 0,
        "cpu_s": pytest.approx(c.cpu, abs=0.01),
        "disabled": "",
    }


def test_a_busy_good_service_is_never_reniced() -> None:
    c = Clocks()
    s = c.share()
    c.run(s, 5.0, 0.6, drops=0.0)  # many new flows, all accepted (an outgoing sweep)
    c.run(s, 5.0, 0.6, drops=0.4)  # a flood mixed with more good traffic than it
    assert c.nices == [] and not s.niced


def test_a_long_idle_gap_counts_as_calm() -> None:
    c = Clocks()
    s = c.share()
    c.run(s, 2.0, 0.5)
    c.wall += 60.0  # no packet for a minute: the next drain sees a tiny share
    c.cpu += 0.001
    s.after_serve()
    assert c.nices == [10, 0]


def test_off_with_nice_zero() -> None:
    c = Clocks()
    s = c.share(nice=0)
    c.run(s, 3.0, 0.9)
    assert c.nices == []


def test_a_nice_that_cannot_be_set_turns_it_off_without_raising() -> None:
    c = Clocks()

    def refuse(value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    s = c.share()
    s.set_nice = refuse
    c.run(s, 3.0, 0.9)
    assert s.disabled.startswith("cannot set nice 10") and not s.niced


def test_set_thread_nice_changes_only_the_calling_thread() -> None:
    got: dict[str, int] = {}

    def body() -> None:
        set_thread_nice(os.getpriority(os.PRIO_PROCESS, 0) + 1)
        got["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=body)
    t.start()
    t.join(5)
    assert got["thread"] == main_before + 1
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_cli_flood_nice() -> None:
    ap = argparse.ArgumentParser()
    _add_queue_arguments(ap)
    assert ap.parse_args([]).flood_nice == 10
    assert ap.parse_args(["--flood-nice", "0"]).flood_nice == 0
    with pytest.raises(SystemExit):
        ap.parse_args(["--flood-nice", "25"])


def test_cli_flood_cpu() -> None:
    ap = argparse.ArgumentParser()
    _add_queue_arguments(ap)
    assert ap.parse_args([]).flood_cpu == 0.05
    assert ap.parse_args(["--flood-cpu", "0"]).flood_cpu == 0.0
    for bad in ("1.5", "-0.1", "lots"):
        with pytest.raises(SystemExit):
            ap.parse_args(["--flood-cpu", bad])


def test_cpu_and_wait_reads_real_schedstat() -> None:
    mine = cpu_and_wait(lambda: [os.getpid()])
    assert mine is not None and mine > 0  # this process has run
    assert cpu_and_wait(lambda: []) is None
    assert cpu_and_wait(lambda: [2**22 + 1]) is None  # no such pid (above pid_max's default)
