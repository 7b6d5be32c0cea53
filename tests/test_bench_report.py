"""Pure benchmark summaries: schedule, aggregation, ratios, tables."""

from __future__ import annotations

import math
from pathlib import Path

from bench.report import (
    RunRow,
    aggregate,
    describe,
    interleaved_schedule,
    percentile,
    thesis_table,
    with_ratios,
    write_sweep_plot,
)


def row(config: str, avg: float, valid: bool = True, rate: float = 150, rep: int = 0) -> RunRow:
    return RunRow(
        config, rate, rep, valid, 0.2, avg, 30.0, 0.5, 0.3, 0.1, 10.0, 150.0, 149.9, 0, 0.5
    )


def test_percentile_nearest_rank() -> None:
    vals = [float(v) for v in range(1, 101)]
    assert percentile(vals, 50) == 50.0
    assert percentile(vals, 99) == 99.0
    assert percentile(vals, 100) == 100.0
    assert math.isnan(percentile([], 50))
    d = describe([3.0, 1.0, 2.0])
    assert d["min"] == 1.0 and d["max"] == 3.0 and d["p50"] == 2.0


def test_schedule_runs_every_config_every_round_rotating() -> None:
    plan = interleaved_schedule(["a", "b", "c"], [150], 3)
    assert len(plan) == 9
    rounds = [[c for rep, _, c in plan if rep == r] for r in range(3)]
    assert rounds[0] == ["a", "b", "c"]
    assert rounds[1] == ["b", "c", "a"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_invalid_runs_are_counted_not_averaged() -> None:
    agg = aggregate([row("gate", 1.0), row("gate", 3.0), row("gate", 100.0, valid=False)])
    f = agg[("gate", 150)]
    assert f["conn_time_avg"] == 2.0
    assert f["conn_time_avg_spread"] == 2.0
    assert (f["valid_runs"], f["invalid_runs"]) == (2, 1)


def test_ratios_are_to_the_same_runs_baseline(tmp_path: Path) -> None:
    rows = [row("none", 0.5), row("gate", 0.75), row("hung", 9.0, valid=False)]
    agg = with_ratios(aggregate(rows), baseline="none")
    assert agg[("gate", 150)]["conn_time_avg_ratio"] == 1.5
    assert agg[("none", 150)]["conn_time_avg_ratio"] == 1.0
    table = thesis_table(agg, 150)
    assert "| gate | 0.2 | 0.8 | 30.0 |" in table
    assert table.count("\n") == 4
    assert "| hung | n/a |" in table and "| 0/1 |" in table  # shown, never averaged
    out = tmp_path / "sweep.png"
    write_sweep_plot(agg, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
