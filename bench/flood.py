"""Flood benchmark (issue 9): the blocked user (uid 1001) opens new TCP connections to random
client ports as fast as the guest can (`xfprobe flood`, bounded in time and count) while httperf
runs against uid 1000's :8000 at 150 conn/s, the gate on with `--block-uid 1001`. Beside it, the
same httperf run with the same gate and no flood: the figures are httperf's success (replies /
connections) and the connection time of the flood run as a ratio to the flood-free one.

With `second_domain`, the gate serves that domain too and a second httperf runs against its
:8000 at the same time: a flood in one domain must not starve the other (needs
`xfgate-lab up --domains 2`).

With `compare` (a source tree of another revision, e.g. `git worktree add /tmp/base HEAD~3`
or a `git archive` of it), the same schedule also runs that tree's gate (its code first on
PYTHONPATH), interleaved with this one's: "before" and "after" in one run, under the same
host load.

    .venv/bin/python -m bench --profile quick --skip thesis --skip sweep --skip micro --skip leak
"""

from __future__ import annotations

import contextlib
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.httperf import HttperfResult, run_httperf
from bench.placement import lab_qemu_pids, place, workload_on
from xfgate.config import DomainConfig
from xfgate_lab.gate_process import gate_process
from xfgate_lab.layout import CLIENT_V4, layout_from_env

SERVER_PORT = 8000
RATE = 150.0
BLOCK = ("--block-uid", "1001")
FLOOD_MAX = 500_000  # connections, a bound beside the time bound
FLOOD_PROCS = 2  # flooding processes (the guest has one vCPU)


@dataclass(frozen=True)
class FloodRun:
    flood: bool
    domain: int
    success_pct: float
    conn_time_avg: float
    connect_ms: float
    conns: int
    replies: int
    errors: int
    valid: bool
    flood_opened: int
    gated: bool = True  # False: the same flood with no gate (the guest's own limit)
    tree: str = ""  # "" this source tree's gate, else the compared tree's label
    rep: int = 0  # the repeat it belongs to
    load: float = -1.0  # the host's 1-minute load average when the run started


def success_pct(r: HttperfResult, planned: int) -> float:
    return 100.0 * r.replies / planned if planned else 0.0


def flood_script(seconds: int, procs: int = FLOOD_PROCS) -> str:
    """Guest shell: `procs` flooding processes as mallory, in the background, bounded."""
    one = shlex.join(["xfprobe", "flood", str(CLIENT_V4), str(seconds), str(FLOOD_MAX)])
    inner = f"{one} >> /tmp/xfr-flood.out 2>&1"
    cmd = f"su -s /bin/sh mallory -c {shlex.quote(inner)}"
    runs = " ".join(f"( timeout {seconds + 5} {cmd} ) &" for _ in range(procs))
    return f"rm -f /tmp/xfr-flood.out; {runs} true"


def _guest(domain: int, command: str, timeout: int = 30) -> str:
    argv = [sys.executable, "-m", "xfgate_lab.cli", "exec", "--domain", str(domain)]
    proc = subprocess.run(
        [*argv, "--timeout", str(timeout), "--", command],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    return proc.stdout


def flood_opened(domain: int) -> int:
    """Connections the flood said it opened (its lines `xfprobe flood: N connections opened`)."""
    total = 0
    for line in _guest(domain, "cat /tmp/xfr-flood.out 2>/dev/null; true").splitlines():
        if line.startswith("xfprobe flood:"):
            total += int(line.split()[2])
    return total


def _httperf(domain: DomainConfig, conns: int, into: dict[int, HttperfResult]) -> None:
    r, _text = run_httperf(
        layout_from_env().client_netns, domain.addresses[0], SERVER_PORT, RATE, conns
    )
    into[domain.id] = r


def run_pair(
    dom: DomainConfig,
    conns: int,
    flood: bool,
    raw: Path,
    rep: int,
    second: DomainConfig | None,
    gated: bool = True,
    tree: Path | None = None,
    gate_cpus: frozenset[int] | None = None,
) -> list[FloodRun]:
    """One httperf run (two at once with a second domain) under the gate (or with no gate:
    what the flood costs the guest itself on its one TCG vCPU), flood or not; `tree`: the
    gate of that source tree instead of this one; `gate_cpus`: every thread of the gate on
    those CPUs once it is ready (threads it starts later inherit them)."""
    doms = [dom, *([second] if second else [])]
    run_args = [a for d in doms for a in ("--domain", str(d.id))] + list(BLOCK)
    label = tree.name if tree else ""
    tag = f"flood-{'on' if flood else 'off'}-{'gate' if gated else 'nogate'}{label}-{rep}"
    seconds = int(conns / RATE) + 5
    load = os.getloadavg()[0]
    results: dict[int, HttperfResult] = {}
    env = None
    if tree is not None:
        # Its code first; PYTHONSAFEPATH: not the working directory (this tree) before it.
        env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "PYTHONSAFEPATH": "1"}
    gate = (
        gate_process(run_args, raw / f"{tag}.gate.log", 90, env=env)
        if gated
        else contextlib.nullcontext()
    )
    with gate as g:
        if g is not None and gate_cpus is not None:
            place(g.pid, gate_cpus)
        for d in doms:  # warm-up: the listener's owner cached, the server's paths translated
            run_httperf(layout_from_env().client_netns, d.addresses[0], SERVER_PORT, RATE, 50)
        if flood:
            _guest(dom.id, flood_script(seconds))
            time.sleep(1.0)  # the flood is on before the measured run starts
        threads = [threading.Thread(target=_httperf, args=(d, conns, results)) for d in doms]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=conns / RATE + 120)
        if flood:
            time.sleep(6.0)  # the flood's own time bound ends it
    opened = flood_opened(dom.id) if flood else 0
    runs = []
    for d in doms:
        r = results.get(d.id, HttperfResult(problems=("httperf did not finish",)))
        runs.append(
            FloodRun(
                flood=flood,
                domain=d.id,
                success_pct=success_pct(r, conns),
                conn_time_avg=r.conn_time_avg,
                connect_ms=r.connect_ms,
                conns=r.connections,
                replies=r.replies,
                errors=r.errors.get("total", 0),
                valid=r.valid,
                flood_opened=opened if d.id == dom.id else 0,
                gated=gated,
                tree=label,
                rep=rep,
                load=load,
            )
        )
    return runs


def run_flood(
    dom: DomainConfig,
    conns: int,
    repeats: int,
    raw: Path,
    second: DomainConfig | None = None,
    compare: Path | None = None,
    gate_cpus: frozenset[int] | None = None,
) -> dict[str, Any]:
    """Interleaved runs: gate without flood, gate with flood, and the flood with no gate (the
    guest's own limit under it), and the same two gate runs with the `compare` tree's gate;
    the summary with ratios per domain (and tree). With `gate_cpus`: the gate on those CPUs,
    the lab's QEMUs, httperf and the flood's helpers on the others, in every run alike (the
    no-gate runs too), so the ratios compare the same workload placement."""
    if gate_cpus is None:
        return _run_flood(dom, conns, repeats, raw, second, compare, None)
    workload = os.sched_getaffinity(0) - gate_cpus
    with workload_on(workload, lab_qemu_pids()):
        summary = _run_flood(dom, conns, repeats, raw, second, compare, gate_cpus)
    summary["placement"] = {"gate_cpus": sorted(gate_cpus), "workload_cpus": sorted(workload)}
    return summary


def _run_flood(
    dom: DomainConfig,
    conns: int,
    repeats: int,
    raw: Path,
    second: DomainConfig | None,
    compare: Path | None,
    gate_cpus: frozenset[int] | None,
) -> dict[str, Any]:
    runs: list[FloodRun] = []
    configs: list[tuple[bool, bool, Path | None]] = [
        (True, False, None),
        (True, True, None),
        (False, True, None),
    ]  # (gated, flood, tree)
    if compare is not None:
        configs += [(True, False, compare), (True, True, compare)]
    for rep in range(repeats):
        order = configs if rep % 2 == 0 else configs[::-1]
        for gated, flood, tree in order:
            pair = run_pair(dom, conns, flood, raw, rep, second, gated, tree, gate_cpus)
            for r in pair:
                gate = f"gate {r.tree}" if r.tree else "gate"
                print(
                    f"  {gate if gated else 'no gate'} flood {'on ' if flood else 'off'}"
                    f" domain {r.domain}: "
                    f"{r.success_pct:.1f} % ok, avg {r.conn_time_avg:.2f} ms, "
                    f"flood opened {r.flood_opened}",
                    flush=True,
                )
            runs += pair
    return {"runs": [asdict(r) for r in runs], "by_domain": summarize(runs)}


def summarize(runs: list[FloodRun]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for d, tree in sorted({(r.domain, r.tree) for r in runs}):
        off = [r for r in runs if (r.domain, r.tree) == (d, tree) and not r.flood and r.gated]
        on = [r for r in runs if (r.domain, r.tree) == (d, tree) and r.flood and r.gated]
        bare = [r for r in runs if r.domain == d and r.flood and not r.gated]
        if not off or not on:
            continue

        def mean(xs: list[float]) -> float:
            return sum(xs) / len(xs)

        base_avg = mean([r.conn_time_avg for r in off])
        flood_avg = mean([r.conn_time_avg for r in on])
        key = f"{d} ({tree})" if tree else str(d)
        out[key] = {
            "success_pct_off": mean([r.success_pct for r in off]),
            "success_pct_on": mean([r.success_pct for r in on]),
            "conn_time_off_ms": base_avg,
            "conn_time_on_ms": flood_avg,
            # No reply at all under the flood: no connection time to compare (rendered "-").
            "conn_time_ratio": flood_avg / base_avg if base_avg and flood_avg else -1.0,
            "flood_opened": mean([float(r.flood_opened) for r in on]),
        }
        if bare:  # the same flood with no gate: what is the guest's, not the gate's
            bare_avg = mean([r.conn_time_avg for r in bare])
            out[key]["success_pct_nogate"] = mean([r.success_pct for r in bare])
            out[key]["conn_time_nogate_ms"] = bare_avg
            out[key]["gate_vs_nogate_under_flood"] = (
                flood_avg / bare_avg if bare_avg and flood_avg else -1.0
            )
    return out


def per_repeat(runs: list[dict[str, Any]]) -> list[str]:
    """One row per repeat and domain (this tree's gate): the flood-free run, the flood run and
    the same flood with no gate side by side, the host's load average at each run's start."""
    rows = []
    keys = sorted({(r["rep"], r["domain"]) for r in runs if not r["tree"]})
    for rep, d in keys:
        mine = [r for r in runs if (r["rep"], r["domain"]) == (rep, d) and not r["tree"]]
        pick = {(r["gated"], r["flood"]): r for r in mine}
        cells = []
        for key in ((True, False), (True, True), (False, True)):
            r = pick.get(key)
            cells.append(
                f"{r['success_pct']:.1f} % / {r['conn_time_avg']:.1f} ms (load {r['load']:.1f})"
                if r
                else "-"
            )
        on, bare = pick.get((True, True)), pick.get((False, True))
        ratio = (
            on["conn_time_avg"] / bare["conn_time_avg"]
            if on and bare and on["conn_time_avg"] and bare["conn_time_avg"]
            else -1.0
        )
        rows.append(f"| {rep} | {d} | {' | '.join(cells)} | {_ratio(ratio)} |")
    return rows


def repeat_ratios(runs: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Per domain (this tree's gate), each repeat's gate / no-gate connection time under the
    flood (repeats missing either run, or with no reply, left out)."""
    out: dict[int, list[float]] = {}
    for rep, d in sorted({(r["rep"], r["domain"]) for r in runs if not r["tree"]}):
        pick = {
            (r["gated"], r["flood"]): r
            for r in runs
            if (r["rep"], r["domain"]) == (rep, d) and not r["tree"]
        }
        on, bare = pick.get((True, True)), pick.get((False, True))
        if on and bare and on["conn_time_avg"] > 0 and bare["conn_time_avg"] > 0:
            out.setdefault(d, []).append(on["conn_time_avg"] / bare["conn_time_avg"])
    return out


def ratio_spread(runs: list[dict[str, Any]]) -> dict[int, tuple[float, float, float, int, int]]:
    """Per domain: median, lowest, highest of the per-repeat ratios, how many, how many <= 1.5."""
    return {
        d: (statistics.median(xs), min(xs), max(xs), len(xs), sum(x <= 1.5 for x in xs))
        for d, xs in repeat_ratios(runs).items()
    }


def _ratio(x: float) -> str:
    return f"{x:.2f}" if x >= 0 else "- (no reply)"


def render(summary: dict[str, Any], conns: int) -> str:
    lines = [
        f"### Flood: uid 1001 floods new connections while httperf runs {conns} connections at "
        f"{RATE:g} conn/s (gate on, --block-uid 1001)",
        "",
        "| domain | success % (no flood) | success % (flood) | conn time ms (no flood) "
        "| conn time ms (flood) | ratio | flood connections opened |",
        "|---|---|---|---|---|---|---|",
    ]
    for d, s in summary.get("by_domain", {}).items():
        lines.append(
            f"| {d} | {s['success_pct_off']:.1f} | {s['success_pct_on']:.1f} "
            f"| {s['conn_time_off_ms']:.2f} | {s['conn_time_on_ms']:.2f} "
            f"| {_ratio(s['conn_time_ratio'])} | {s['flood_opened']:.0f} |"
        )
    bare = {d: s for d, s in summary.get("by_domain", {}).items() if "conn_time_nogate_ms" in s}
    if bare:
        lines += [
            "",
            "The same flood with no gate (what the flood costs the guest itself):",
            "",
            "| domain | success % (flood, no gate) | conn time ms (flood, no gate) "
            "| gate / no gate under the flood |",
            "|---|---|---|---|",
        ]
        for d, s in bare.items():
            lines.append(
                f"| {d} | {s['success_pct_nogate']:.1f} | {s['conn_time_nogate_ms']:.2f} "
                f"| {_ratio(s['gate_vs_nogate_under_flood'])} |"
            )
    placement = summary.get("placement")
    if placement:
        lines += [
            "",
            f"Placement: the gate on CPU {placement['gate_cpus']}, the lab's QEMUs, httperf and "
            f"the bench on CPU {placement['workload_cpus']} in every run (the no-gate runs too).",
        ]
    spread = ratio_spread(summary.get("runs", []))
    if spread:
        lines += ["", "Gate / no gate under the flood, per repeat:", ""]
        lines += [
            f"- domain {d}: median {_ratio(med)} of {n} repeats (range {_ratio(lo)}-{_ratio(hi)}),"
            f" {met} of {n} within 1.5x"
            for d, (med, lo, hi, n, met) in spread.items()
        ]
    rows = per_repeat(summary.get("runs", []))
    if rows:
        lines += [
            "",
            "Every repeat (success / mean connection time, the host's load average at the start):",
            "",
            "| repeat | domain | gate, no flood | gate, flood | no gate, flood "
            "| gate / no gate under the flood |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    return "\n".join(lines) + "\n"
