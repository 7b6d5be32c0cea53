"""The flood benchmark's pure parts and its CPU placement (issue 9's flood figures)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from bench.flood import ratio_spread, render, repeat_ratios
from bench.placement import parse_cpus, place, restore, workload_on

ONLINE = sorted(os.sched_getaffinity(0))
needs_two = pytest.mark.skipif(len(ONLINE) < 2, reason="needs 2 CPUs to place anything apart")


def run(
    rep: int, domain: int, gated: bool, flood: bool, ms: float, tree: str = ""
) -> dict[str, Any]:
    return {
        "rep": rep,
        "domain": domain,
        "gated": gated,
        "flood": flood,
        "conn_time_avg": ms,
        "success_pct": 100.0,
        "load": 1.0,
        "tree": tree,
    }


RUNS = [
    run(0, 1, True, False, 3.0),
    run(0, 1, True, True, 30.0),
    run(0, 1, False, True, 15.0),  # 2.0
    run(1, 1, True, False, 3.0),
    run(1, 1, True, True, 12.0),
    run(1, 1, False, True, 16.0),  # 0.75
    run(2, 1, True, True, 14.0),
    run(2, 1, False, True, 10.0),  # 1.4
    run(2, 1, True, True, 99.0, tree="base"),  # another tree: not this gate's
    run(3, 1, True, True, 0.0),  # no reply: no ratio
    run(3, 1, False, True, 10.0),
]


def test_repeat_ratios_pair_each_repeat_and_skip_other_trees_and_no_replies() -> None:
    assert repeat_ratios(RUNS) == {1: [2.0, 0.75, 1.4]}


def test_ratio_spread_median_range_and_count_within_target() -> None:
    med, lo, hi, n, met = ratio_spread(RUNS)[1]
    assert (med, lo, hi, n, met) == (1.4, 0.75, 2.0, 3, 2)


def test_render_names_placement_and_per_repeat_spread() -> None:
    text = render({"runs": RUNS, "placement": {"gate_cpus": [1], "workload_cpus": [0]}}, 100)
    assert "the gate on CPU [1]" in text
    assert "domain 1: median 1.40 of 3 repeats (range 0.75-2.00), 2 of 3 within 1.5x" in text


def test_parse_cpus() -> None:
    assert parse_cpus(str(ONLINE[0])) == {ONLINE[0]}
    for bad in ("", "x", "1-", "999", ",".join(map(str, ONLINE))):
        with pytest.raises(ValueError):
            parse_cpus(bad)


@needs_two
def test_workload_on_places_the_caller_and_puts_it_back() -> None:
    before = os.sched_getaffinity(0)
    with workload_on({ONLINE[0]}, ()):
        assert os.sched_getaffinity(0) == {ONLINE[0]}
    assert os.sched_getaffinity(0) == before


@needs_two
def test_place_moves_every_thread_of_a_process_and_restore_puts_them_back() -> None:
    code = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(50):  # its threads started
            if len(os.listdir(f"/proc/{child.pid}/task")) >= 4:
                break
            time.sleep(0.1)
        before = place(child.pid, {ONLINE[-1]})
        assert len(before) >= 4
        assert all(os.sched_getaffinity(t) == {ONLINE[-1]} for t in before)
        restore(before)
        assert all(os.sched_getaffinity(t) == cpus for t, cpus in before.items())
    finally:
        child.kill()
        child.wait()
