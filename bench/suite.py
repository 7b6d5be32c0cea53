"""The benchmark suite: the thesis's httperf measurements on the lab guest, every xfgate mode
side by side, a rate sweep, micro-benchmarks, the leak benchmark and the flood benchmark
(issue 9: a blocked user's connection flood beside the flood-free run).

    .venv/bin/python -m bench --profile quick      # < 10 minutes
    .venv/bin/python -m bench --profile full       # the thesis-length runs (hours)

Writes raw outputs, summary.json, results.md and sweep.png under bench/results/<time>/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.flood import render as render_flood
from bench.flood import run_flood
from bench.gate import running_gate
from bench.httperf import run_httperf
from bench.leak import LeakResult, run_leak
from bench.outgoing import client_server, run_connload
from bench.placement import parse_cpus
from bench.report import (
    RunRow,
    aggregate,
    interleaved_schedule,
    sweep_table,
    thesis_table,
    with_ratios,
    write_sweep_plot,
)
from bench.scale import DEFAULT_CROWD, run_scale
from bench.scale import render as render_scale
from xfgate.config import DomainConfig, get_domain
from xfgate.errors import PrerequisiteError
from xfgate_lab.errors import LabError
from xfgate_lab.layout import domains_file_from_env, layout_from_env

SERVER_PORT = 8000  # the guest's static epoll server (uid 1000): busybox httpd saturates ~150/s
BLOCK = ("--block-uid", "1001")  # a rule in force that matches none of the measured traffic
OUT_PREFIX = "out-"  # a sweep configuration measured in the outgoing direction (bench.outgoing)


@dataclass(frozen=True)
class Profile:
    name: str
    thesis_conns: int  # connections per run at 150 conn/s
    thesis_repeats: int
    thesis_configs: tuple[str, ...]
    sweep_rates: tuple[float, ...]
    sweep_seconds: float
    sweep_configs: tuple[str, ...]
    sweep_repeats: int
    leak_conns: int
    leak_configs: tuple[str, ...]
    flood_conns: int  # httperf connections at 150 conn/s per flood / flood-free run
    flood_repeats: int
    # The outgoing sweep (bench.outgoing), interleaved with the incoming one at the same rates.
    out_sweep_configs: tuple[str, ...] = ("out-none", "out-gate")


ALL_CONFIGS = ("none", "gate", "gate-nofastpath", "poll-3", "poll-5", "poll-10", "poll-15")
PROFILES = {
    # A minute or two: proves the harness end to end (used by the test suite), no numbers to quote.
    "smoke": Profile(
        name="smoke",
        thesis_conns=150,
        thesis_repeats=1,
        thesis_configs=("none", "gate", "poll-3"),
        sweep_rates=(300,),
        sweep_seconds=1,
        sweep_configs=("none", "gate"),
        sweep_repeats=1,
        leak_conns=3,
        leak_configs=("poll-3", "gate"),
        flood_conns=150,
        flood_repeats=1,
    ),
    "quick": Profile(
        name="quick",
        thesis_conns=1200,
        thesis_repeats=3,
        thesis_configs=ALL_CONFIGS,
        sweep_rates=(150, 400, 800, 1200, 1600),
        sweep_seconds=5,
        sweep_configs=("none", "gate", "gate-nofastpath"),
        sweep_repeats=1,
        leak_conns=20,
        leak_configs=("poll-3", "poll-15", "gate"),
        flood_conns=1200,
        flood_repeats=2,
    ),
    "full": Profile(
        name="full",
        thesis_conns=30000,  # 200 s at 150/s: >= 30 reply-rate samples (one per 5 s)
        thesis_repeats=3,
        thesis_configs=ALL_CONFIGS,
        sweep_rates=(150, 300, 500, 800, 1000, 1200, 1500, 2000),
        sweep_seconds=60,
        sweep_configs=("none", "gate", "gate-nofastpath", "poll-3"),
        sweep_repeats=2,
        leak_conns=100,
        leak_configs=("poll-3", "poll-5", "poll-10", "poll-15", "gate", "gate-nofastpath"),
        flood_conns=9000,
        flood_repeats=3,
    ),
}


def _cpu_list(text: str) -> frozenset[int]:
    try:
        return parse_cpus(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def preflight(domain: int) -> DomainConfig:
    if os.geteuid() != 0:
        raise PrerequisiteError("the benchmarks need root (namespaces, iptables, NFQUEUE)")
    dom = get_domain(domain, domains_file_from_env())
    client = layout_from_env().client_netns
    if not Path(f"/run/netns/{client}").exists():
        raise LabError(f"the lab is not up (no netns {client}): run `xfgate-lab up` first")
    if not dom.addresses:
        raise LabError(f"domain {domain} has no address in the domains file")
    return dom


def run_one(
    dom: DomainConfig, config: str, rate: float, conns: int, rep: int, raw: Path
) -> tuple[RunRow, dict[str, Any]]:
    server = dom.addresses[0]
    tag = f"{config}-r{rate:g}-n{conns}-{rep}"
    load = loadavg()
    client = layout_from_env().client_netns  # $XFGATE_LAB_PREFIX selects a private lab
    outgoing = config.startswith(OUT_PREFIX)  # from the guest (uid 1000) to the client netns
    gate_config = config.removeprefix(OUT_PREFIX)
    with running_gate(dom.id, gate_config, BLOCK, raw / f"{tag}.gate.log"):
        # Warm-up: the listener's owner gets cached and the server's accept path is hot.
        if outgoing:
            run_connload(dom.id, min(rate, 150), 50)
            result, text = run_connload(dom.id, rate, conns)
        else:
            run_httperf(client, server, SERVER_PORT, min(rate, 150), 50)
            result, text = run_httperf(client, server, SERVER_PORT, rate, conns)
    (raw / f"{tag}.httperf.txt").write_text(text)
    row = RunRow(
        config=config,
        rate=rate,
        repeat=rep,
        valid=result.valid,
        conn_time_min=result.conn_time_min,
        conn_time_avg=result.conn_time_avg,
        conn_time_max=result.conn_time_max,
        conn_time_median=result.conn_time_median,
        conn_time_stddev=result.conn_time_stddev,
        connect_ms=result.connect_ms,
        test_duration_s=result.test_duration_s,
        reply_rate_avg=result.reply_rate_avg,
        conn_rate=result.conn_rate,
        errors_total=result.errors.get("total", 0),
        loadavg_before=load,
        problems=result.problems,
        success_pct=100.0 * result.replies / conns if conns else math.nan,
    )
    status = "ok" if result.valid else "INVALID " + "; ".join(result.problems)
    print(
        f"  {config:16s} rate {rate:>6g} conns {conns:>6d}: avg {result.conn_time_avg:.2f} ms"
        f" connect {result.connect_ms:.2f} ms, {result.conn_rate:.0f} conn/s, load {load:.2f}"
        f" [{status}]",
        flush=True,
    )
    return row, result.to_dict()


def run_micro(out: Path, domain: int) -> dict[str, Any]:
    """The parts' micro-benchmarks, each a module printing one JSON document."""
    scripts = {
        "vmi_bench": ["--domain", str(domain)],  # full walk, targeted lookup, pause
        "verdict_bench": ["--netns"],  # cache-hit decision, NFQUEUE pkt/s
    }
    results: dict[str, Any] = {}
    for name, extra in scripts.items():
        proc = subprocess.run(
            [sys.executable, "-m", f"bench.{name}", *extra],
            capture_output=True,
            text=True,
            timeout=900,
            cwd=Path(__file__).parent.parent,
        )
        (out / f"{name}.txt").write_text(proc.stdout + proc.stderr)
        try:
            results[name] = json.loads(proc.stdout[proc.stdout.index("{") :])
        except ValueError:
            results[name] = {"error": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
    return results


def client_limited(
    agg: dict[tuple[str, float], dict[str, Any]], rate: float, baseline: str = "none"
) -> bool:
    """The baseline itself could not sustain `rate`: the client or the guest is the limit, not
    xfgate, and the rate is reported as such."""
    base = agg.get((baseline, rate))
    return base is not None and float(base.get("conn_rate", 0.0)) < 0.9 * rate


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--profile",
        choices=sorted([*PROFILES, "scale"]),
        default="quick",
        help="scale: issue 10's figures on this lab and on a crowd lab it brings up itself",
    )
    ap.add_argument("--domain", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--conns",
        type=int,
        default=0,
        help="connections per thesis-table run (the thesis used 100000: 11 min per run)",
    )
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["thesis", "sweep", "outgoing", "micro", "leak", "flood"],
    )
    ap.add_argument(
        "--flood-second-domain",
        type=int,
        default=0,
        help="also serve this domain in the flood benchmark's gate and measure it (a lab of "
        "`xfgate-lab up --domains 2`)",
    )
    ap.add_argument(
        "--flood-compare-tree",
        type=Path,
        default=None,
        help="also run the flood benchmark's gate from this source tree (another revision),"
        " interleaved: before and after in one run",
    )
    ap.add_argument(
        "--flood-gate-cpus",
        type=_cpu_list,
        default=None,
        help="the flood benchmark's gate on these CPUs (e.g. 1), the lab's QEMUs and httperf on"
        " the others, in every run alike: the gate as a host with a dedicated core runs it",
    )
    ap.add_argument(
        "--flood-repeats", type=int, default=0, help="flood repeats (default: the profile's)"
    )
    ap.add_argument("--crowd", default=DEFAULT_CROWD, help="scale profile: TASKS,SOCKETS")
    args = ap.parse_args(argv)
    if args.profile == "scale":
        return main_scale(args.domain, args.out, args.crowd)
    prof = PROFILES[args.profile]
    if args.conns:
        prof = replace(prof, thesis_conns=args.conns)
    dom = preflight(args.domain)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path(__file__).parent / "results" / stamp
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rows: list[RunRow] = []
    raw_results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "profile": asdict(prof),
        "machine": {"nproc": os.cpu_count(), "uname": os.uname().release, "loadavg": loadavg()},
        "guest": {"kernel": dom.kernel.release, "server": f"{dom.addresses[0]}:{SERVER_PORT}"},
    }
    # Under TCG the guest translates each code path on first use: warm its network and server
    # paths once, unmeasured, so the first configuration in the schedule is not penalised.
    run_httperf(layout_from_env().client_netns, dom.addresses[0], SERVER_PORT, 300, 900)
    if "thesis" not in args.skip:
        print(f"thesis table: 150 conn/s x {prof.thesis_conns} connections", flush=True)
        for rep, rate, config in interleaved_schedule(
            prof.thesis_configs, [150], prof.thesis_repeats
        ):
            row, res = run_one(dom, config, rate, prof.thesis_conns, rep, raw)
            rows.append(row)
            raw_results.append({"config": config, "rate": rate, "repeat": rep, **res})
    sweep_rows: list[RunRow] = []
    sweep_configs = [
        *(prof.sweep_configs if "sweep" not in args.skip else ()),
        *(prof.out_sweep_configs if "outgoing" not in args.skip else ()),
    ]
    if sweep_configs:
        print(f"rate sweep: {', '.join(sweep_configs)} interleaved", flush=True)
        plan = interleaved_schedule(sweep_configs, prof.sweep_rates, prof.sweep_repeats)
        with contextlib.ExitStack() as stack:
            if any(c.startswith(OUT_PREFIX) for c in sweep_configs):
                stack.enter_context(client_server(raw))
                run_connload(dom.id, 300, 900)  # warm the guest's outgoing paths, unmeasured
            for rep, rate, config in plan:
                conns = int(rate * prof.sweep_seconds)
                row, res = run_one(dom, config, rate, conns, rep, raw)
                sweep_rows.append(row)
                raw_results.append(
                    {"config": config, "rate": rate, "repeat": rep, "sweep": True, **res}
                )
    thesis_agg = with_ratios(aggregate(rows), baseline="none")
    in_rows = [r for r in sweep_rows if not r.config.startswith(OUT_PREFIX)]
    out_rows = [r for r in sweep_rows if r.config.startswith(OUT_PREFIX)]
    sweep_agg = with_ratios(aggregate(in_rows), baseline="none")
    out_agg = with_ratios(aggregate(out_rows), baseline=OUT_PREFIX + "none")
    if sweep_agg or out_agg:
        write_sweep_plot({**sweep_agg, **out_agg}, out / "sweep.png")
    micro = run_micro(raw, dom.id) if "micro" not in args.skip else {}
    leaks: list[LeakResult] = []
    if "leak" not in args.skip:
        print(f"leak: a blocked user opens {prof.leak_conns} new connections", flush=True)
        for config in prof.leak_configs:
            leak = run_leak(dom, config, prof.leak_conns, raw)
            print(
                f"  {config:16s} {leak.packets_out} packets / {leak.syns_out} SYNs got out",
                flush=True,
            )
            leaks.append(leak)
    flood: dict[str, Any] = {}
    if "flood" not in args.skip:
        second = (
            get_domain(args.flood_second_domain, domains_file_from_env())
            if (args.flood_second_domain)
            else None
        )
        print(
            f"flood: uid 1001 floods while httperf runs {prof.flood_conns} connections at "
            f"150 conn/s, x{args.flood_repeats or prof.flood_repeats}",
            flush=True,
        )
        flood = run_flood(
            dom,
            prof.flood_conns,
            args.flood_repeats or prof.flood_repeats,
            raw,
            second,
            args.flood_compare_tree,
            args.flood_gate_cpus,
        )
    summary.update(
        {
            "flood": flood,
            "thesis": {f"{c}@{r:g}": f for (c, r), f in thesis_agg.items()},
            "sweep": {f"{c}@{r:g}": f for (c, r), f in sweep_agg.items()},
            "sweep_outgoing": {f"{c}@{r:g}": f for (c, r), f in out_agg.items()},
            "client_limited_rates": [r for r in prof.sweep_rates if client_limited(sweep_agg, r)],
            "client_limited_rates_outgoing": [
                r for r in prof.sweep_rates if client_limited(out_agg, r, OUT_PREFIX + "none")
            ],
            "micro": micro,
            "leak": [asdict(x) for x in leaks],
            "runs": raw_results,
            "elapsed_s": time.monotonic() - started,
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    md = render_markdown(summary, thesis_agg, leaks)
    if sweep_agg or out_agg:
        md += "\n" + sweep_table(sweep_agg, out_agg, prof.sweep_rates) + "\n"
    if flood:
        md += "\n" + render_flood(flood, prof.flood_conns)
    (out / "results.md").write_text(md)
    print(md)
    print(f"results in {out} ({summary['elapsed_s']:.0f} s)")
    return 0


def main_scale(domain: int, out_dir: Path | None, crowd: str) -> int:
    """`--profile scale`: bench.scale's table, written like the other profiles' results."""
    dom = preflight(domain)
    out = out_dir or Path(__file__).parent / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "profile": {"name": "scale", "crowd": crowd},
        "machine": {"nproc": os.cpu_count(), "uname": os.uname().release, "loadavg": loadavg()},
        "guest": {"kernel": dom.kernel.release},
    }
    summary["scale"] = run_scale(out, dom.id, crowd)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    md = render_scale(summary["scale"])
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"results in {out} ({summary['scale']['elapsed_s']:.0f} s)")
    return 0


def render_markdown(
    summary: dict[str, Any],
    thesis_agg: dict[tuple[str, float], dict[str, Any]],
    leaks: Sequence[LeakResult],
) -> str:
    parts = [
        f"### Connection time at 150 conn/s (ms), profile {summary['profile']['name']}",
        "",
        thesis_table(thesis_agg, 150) if thesis_agg else "(not run)",
        "",
    ]
    if summary.get("client_limited_rates"):
        parts += [
            "Rates the baseline itself could not sustain (client/guest limit, not xfgate's): "
            + ", ".join(f"{r:g}" for r in summary["client_limited_rates"]),
            "",
        ]
    micro = summary.get("micro") or {}
    if micro:
        parts += ["### Micro-benchmarks", "", "```json", json.dumps(micro, indent=1), "```", ""]
    if leaks:
        parts += [
            "### Leak: packets of a blocked user's new connections that reached the client",
            "",
            "| configuration | connections | packets out | SYNs out |",
            "|---|---|---|---|",
            *[f"| {x.config} | {x.connections} | {x.packets_out} | {x.syns_out} |" for x in leaks],
            "",
        ]
    return "\n".join(parts)
