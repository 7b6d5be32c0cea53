"""Pure summaries of benchmark runs: thesis-style tables, ratios to the baseline of the same
run, percentiles. No I/O here except `write_plots`, which only draws what it is given."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def describe(values: Sequence[float]) -> dict[str, float]:
    """p50/p99/avg/min/max of timings, the figures the README quotes."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": min(values),
        "avg": statistics.fmean(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }


@dataclass(frozen=True)
class RunRow:
    """One httperf run of one configuration at one rate, as it goes into tables."""

    config: str
    rate: float
    repeat: int
    valid: bool
    conn_time_min: float
    conn_time_avg: float
    conn_time_max: float
    conn_time_median: float
    conn_time_stddev: float
    connect_ms: float
    test_duration_s: float
    reply_rate_avg: float
    conn_rate: float
    errors_total: int
    loadavg_before: float
    problems: tuple[str, ...] = ()
    success_pct: float = math.nan  # replies / planned connections, in %


def interleaved_schedule(
    configs: Sequence[str], rates: Sequence[float], repeats: int
) -> list[tuple[int, float, str]]:
    """(repeat, rate, config) in the order to run them: every configuration once per round,
    rotating the order each round, so slow drift of the shared host shows up as spread in every
    configuration alike instead of as a difference between them."""
    plan: list[tuple[int, float, str]] = []
    for rep in range(repeats):
        for rate in rates:
            shift = rep % len(configs) if configs else 0
            order = list(configs[shift:]) + list(configs[:shift])
            plan.extend((rep, rate, c) for c in order)
    return plan


def aggregate(rows: Iterable[RunRow]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (config, rate): mean of each figure over valid repeats, with their spread."""
    groups: dict[tuple[str, float], list[RunRow]] = {}
    invalid: dict[tuple[str, float], int] = {}
    for r in rows:
        key = (r.config, r.rate)
        if r.valid:
            groups.setdefault(key, []).append(r)
        else:
            invalid[key] = invalid.get(key, 0) + 1
            groups.setdefault(key, [])
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for key, rs in groups.items():
        agg: dict[str, Any] = {"valid_runs": len(rs), "invalid_runs": invalid.get(key, 0)}
        for fld in (
            "conn_time_min",
            "conn_time_avg",
            "conn_time_max",
            "conn_time_median",
            "conn_time_stddev",
            "connect_ms",
            "test_duration_s",
            "reply_rate_avg",
            "conn_rate",
            "success_pct",
        ):
            vals = [float(getattr(r, fld)) for r in rs]
            agg[fld] = statistics.fmean(vals) if vals else math.nan
            agg[fld + "_spread"] = (max(vals) - min(vals)) if len(vals) > 1 else 0.0
        agg["errors_total"] = sum(r.errors_total for r in rs)
        agg["loadavg"] = statistics.fmean([r.loadavg_before for r in rs]) if rs else math.nan
        out[key] = agg
    return out


def with_ratios(
    agg: Mapping[tuple[str, float], dict[str, Any]], baseline: str
) -> dict[tuple[str, float], dict[str, Any]]:
    """Adds `<figure>_ratio` = figure / the baseline configuration's figure at the same rate."""
    out: dict[tuple[str, float], dict[str, Any]] = {}
    for (config, rate), figures in agg.items():
        base = agg.get((baseline, rate))
        enriched = dict(figures)
        for fld in ("conn_time_avg", "conn_time_median", "connect_ms", "test_duration_s"):
            b = base.get(fld) if base else None
            v = figures.get(fld)
            enriched[fld + "_ratio"] = (
                v / b if isinstance(b, float) and isinstance(v, float) and b > 0 else math.nan
            )
        out[(config, rate)] = enriched
    return out


def _fmt(x: Any, digits: int = 1) -> str:
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def thesis_table(agg: Mapping[tuple[str, float], dict[str, Any]], rate: float) -> str:
    """Markdown table in the thesis's shape (connection time min/avg/max/median/stddev in ms,
    connect time, test duration), one row per configuration at `rate`, with ratios."""
    lines = [
        "| configuration | min | avg | max | median | stddev | connect | duration s | avg ratio"
        " | valid/invalid runs | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (config, r), f in sorted(agg.items(), key=lambda kv: kv[0][0]):
        if r != rate:
            continue
        ratio = f.get("conn_time_avg_ratio", math.nan)
        lines.append(
            f"| {config} | {_fmt(f['conn_time_min'])} | {_fmt(f['conn_time_avg'])} "
            f"| {_fmt(f['conn_time_max'])} | {_fmt(f['conn_time_median'])} "
            f"| {_fmt(f['conn_time_stddev'])} | {_fmt(f['connect_ms'])} "
            f"| {_fmt(f['test_duration_s'], 2)} | {_fmt(ratio, 2)} "
            f"| {f['valid_runs']}/{f['invalid_runs']} | {_fmt(f['loadavg'], 2)} |"
        )
    return "\n".join(lines)


def sweep_table(
    incoming: Mapping[tuple[str, float], dict[str, Any]],
    outgoing: Mapping[tuple[str, float], dict[str, Any]],
    rates: Sequence[float],
    gate: str = "gate",
    out_prefix: str = "out-",
) -> str:
    """Both directions of the rate sweep side by side: average connection time (ms) with no
    gate and with the gate, their ratio, success and the host's load, one row per rate."""

    def cell(agg: Mapping[tuple[str, float], dict[str, Any]], config: str, rate: float) -> str:
        f = agg.get((config, rate))
        if f is None:
            return "- | - | -"
        if not f["valid_runs"]:
            return f"invalid x{f['invalid_runs']} | - | -"
        return (
            f"{_fmt(f['conn_time_avg'], 2)} | {_fmt(f.get('success_pct', math.nan))} "
            f"| {_fmt(f['loadavg'], 1)}"
        )

    def ratio(agg: Mapping[tuple[str, float], dict[str, Any]], config: str, rate: float) -> str:
        f = agg.get((config, rate))
        return "**" + _fmt(f.get("conn_time_avg_ratio", math.nan), 2) + "**" if f else "-"

    head = (
        "| offered conn/s | in: none ms | success % | load | in: gate ms | success % | load "
        "| in gate/none | out: none ms | success % | load | out: gate ms | success % | load "
        "| out gate/none |"
    )
    lines = [
        "### Rate sweep, both directions (incoming: httperf in the client netns to the guest;"
        " outgoing: connload in the guest as uid 1000 to the client netns)",
        "",
        head,
        "|" + "---|" * 15,
    ]
    o_none, o_gate = out_prefix + "none", out_prefix + gate
    for r in rates:
        lines.append(
            f"| {r:g} | {cell(incoming, 'none', r)} | {cell(incoming, gate, r)} "
            f"| {ratio(incoming, gate, r)} | {cell(outgoing, o_none, r)} "
            f"| {cell(outgoing, o_gate, r)} | {ratio(outgoing, o_gate, r)} |"
        )
    return "\n".join(lines)


def write_sweep_plot(
    agg: Mapping[tuple[str, float], dict[str, Any]], path: Path, figure: str = "conn_time_avg"
) -> None:
    """Connection time (or another figure) against offered rate, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({c for c, _ in agg})
    values = [f[figure] for f in agg.values() if not math.isnan(f[figure])]
    top = max(values) * 1.5 if values else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_title("x: no valid run at that rate (httperf hung or ran out of fds)", fontsize=8)
    for i, config in enumerate(configs):
        pts = sorted((rate, f[figure]) for (c, rate), f in agg.items() if c == config)
        pts = [(x, y) for x, y in pts if not math.isnan(y)]
        if pts:
            style = "--" if config.startswith("out-") else "-"  # outgoing (bench.outgoing)
            line = ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=config
            )
        failed = sorted(r for (c, r), f in agg.items() if c == config and not f["valid_runs"])
        if failed:  # hung or fd-exhausted runs: shown, never averaged
            color = line[0].get_color() if pts else None
            ax.scatter(failed, [top * 1.25**i] * len(failed), marker="x", s=80, color=color)
    ax.set_xlabel("offered rate (conn/s)")
    ax.set_ylabel(figure.replace("_", " ") + " (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
