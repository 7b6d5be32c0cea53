"""The outgoing sweep and memory benchmarks' pure parts: connload's output through httperf's
parser, the guest command, the two-direction sweep table, smaps sums without guest RAM."""

from __future__ import annotations

import math

from bench.httperf import parse_httperf
from bench.memory_bench import parse_smaps
from bench.outgoing import connload_command
from bench.report import RunRow, aggregate, sweep_table, with_ratios

# Captured from the guest's connload (lab xq4, 2026-11-30).
CONNLOAD_OK = """connload 198.18.0.1:8400 rate 150 num 300 timeout 5000 ms
Total: connections 300 requests 300 replies 300 test-duration 2.009 s
Connection rate: 149.4 conn/s
Connection time [ms]: min 1.11 avg 22.52 max 51.39 median 21.98 stddev 10.58
Connection time [ms]: connect 7.84
Reply status: 1xx=0 2xx=300 3xx=0 4xx=0 5xx=0
Errors: total 0 client-timo 0 socket-timo 0 connrefused 0 connreset 0
Errors: fd-unavail 0 addrunavail 0 ftab-full 0 other 0
"""
CONNLOAD_SATURATED = """connload 198.18.0.1:8400 rate 800 num 2400 timeout 5000 ms
Total: connections 2400 requests 1169 replies 1169 test-duration 4.081 s
Connection rate: 588.1 conn/s
Connection time [ms]: min 76.20 avg 1828.56 max 2780.42 median 1783.01 stddev 514.66
Connection time [ms]: connect 873.52
Reply status: 1xx=0 2xx=1169 3xx=0 4xx=0 5xx=0
Errors: total 1231 client-timo 0 socket-timo 0 connrefused 0 connreset 0
Errors: fd-unavail 1231 addrunavail 0 ftab-full 0 other 0
"""


def test_connload_output_parses_as_httperf() -> None:
    r = parse_httperf(CONNLOAD_OK, expected_conns=300)
    assert r.valid
    assert (r.connections, r.replies, r.status_2xx) == (300, 300, 300)
    assert r.conn_time_avg == 22.52 and r.conn_time_median == 21.98 and r.connect_ms == 7.84
    assert r.conn_rate == 149.4 and r.errors["total"] == 0


def test_connload_over_its_open_bound_is_invalid() -> None:
    r = parse_httperf(CONNLOAD_SATURATED, expected_conns=2400)
    assert not r.valid
    assert r.errors["fd-unavail"] == 1231 and r.replies == 1169


def test_connload_runs_as_uid_1000_to_the_client() -> None:
    cmd = connload_command(400, 2000)
    assert cmd.startswith("su -s /bin/sh web -c ")
    assert "connload 198.18.0.1 8400 400 2000 5000" in cmd


def _row(config: str, rate: float, avg: float, valid: bool = True) -> RunRow:
    return RunRow(config, rate, 0, valid, 1, avg, 9, avg, 1, 1, 5, rate, rate, 0, 2.5, (), 100.0)


def test_sweep_table_puts_both_directions_side_by_side() -> None:
    inc = with_ratios(aggregate([_row("none", 150, 2.0), _row("gate", 150, 2.2)]), "none")
    out = with_ratios(
        aggregate(
            [
                _row("out-none", 150, 4.0),
                _row("out-gate", 150, 5.0),
                _row("out-none", 800, 0.0, valid=False),
            ]
        ),
        "out-none",
    )
    table = sweep_table(inc, out, [150, 800])
    line150 = next(x for x in table.splitlines() if x.startswith("| 150 |"))
    assert "**1.10**" in line150 and "**1.25**" in line150
    line800 = next(x for x in table.splitlines() if x.startswith("| 800 |"))
    assert "invalid x1" in line800
    assert math.isclose(out[("out-gate", 150)]["success_pct"], 100.0)


SMAPS = """55d0c0000000-55d0c0001000 r--p 00000000 08:01 123   /usr/bin/python3.11
Size:                  4 kB
Rss:                   4 kB
Pss:                   2 kB
Private_Clean:         1 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd mr mw me sd
7f0000000000-7f0010000000 r--s 00000000 00:1a 999   /dev/shm/xq4-guest1.mem
Size:             262144 kB
Rss:                9000 kB
Pss:                4500 kB
Private_Clean:       700 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0010000000-7f0010100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1000 kB
Pss:                1000 kB
Private_Clean:         0 kB
Private_Dirty:      1000 kB
Anonymous:          1000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  20 kB
Private_Dirty:        20 kB
"""


def test_smaps_sum_leaves_out_guest_ram() -> None:
    t = parse_smaps(SMAPS, {"/dev/shm/xq4-guest1.mem"})
    assert t.private_kb == 1 + 1000 + 20
    assert t.rss_kb == 4 + 1000 + 20 and t.anonymous_kb == 1000
    assert (t.guest_ram_rss_kb, t.guest_ram_private_kb, t.guest_ram_mappings) == (9000, 700, 1)
    everything = parse_smaps(SMAPS, set())
    assert everything.private_kb == t.private_kb + 700 and everything.guest_ram_mappings == 0


def test_scale_table_puts_both_labs_side_by_side() -> None:
    from bench.scale import render

    small = {
        "ps_tasks": 51,
        "ps_sockets": 6,
        "ps_end_to_end_s": 2.1,
        "vmi_bench": {"full_walk": {"p50_ms": 11.5, "p99_ms": 16.1}, "decisions_per_s": 3000},
        "rest_bench": {"gate_cpu_percent_of_one_core": 1.03},
        "loadavg_before": [2.0, 1.0, 1.0],
        "ps_bench": {
            "ps_gate": {"p50_ms": 120.0, "p99_ms": 150.0},
            "ps_gate_first_s": 0.2,
            "ps_walk": {"p50_ms": 280.0},
        },
    }
    md = render({"crowd": "2000,20000", "small": small, "crowd_figures": {"error": "no lab"}})
    assert (
        "| `xfgate ps --json` through a running gate p50 / p99 | 120 / 150 ms"
        " (first 0.2 s; --walk p50 280 ms) | - (not run) | <= 0.3 s |"
    ) in md
    assert "| full walk p50 / p99 | 11.5 / 16.1 ms | - |" in md
    assert "| gate CPU at rest (% of one core) | 1.03 % | - | <= 1 % |" in md
    assert "crowd: no lab" in md
    assert "| host load average before / after | 2 / - | - / - | - |" in md


def test_memory_bench_takes_the_units_interpreter_setting_only() -> None:
    from bench.memory_bench import UNIT, unit_environment

    env = unit_environment(UNIT.read_text())
    assert env == {"SETUPTOOLS_USE_DISTUTILS": "stdlib"}  # paths (run dir, cache) stay the lab's
    assert unit_environment("[Service]\nEnvironment=XFGATE_CACHE=/x\n") == {}
