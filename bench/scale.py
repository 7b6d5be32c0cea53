"""`python -m bench --profile scale` (issue 10): the scale figures of the current lab (the 51-task
guest) and of a crowded guest, from one run, in one table.

The figures come from the modules that already measure them, each run as a subprocess against
one lab (its domains file and prefix given in the child's environment, never written into this
process's): `bench.vmi_bench` (full walk, lookup, new-sock lookup, decisions/s, paused walk),
`bench.rest_bench` (the gate's CPU at rest) and `xfgate ps --json` end to end (Python start and
profile load included, as an operator sees it). The crowd lab is brought up by this command
with its own prefix (`<prefix>c`) and its own domains file, and always torn down after.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xfgate_lab.layout import domains_file_from_env, layout_from_env

log = logging.getLogger(__name__)

REPO = Path(__file__).parent.parent
DEFAULT_CROWD = "2000,20000"
UP_TIMEOUT_S = 1200.0  # boot + starting 2,000 tasks / 20,000 sockets under TCG on a loaded host
MODULE_TIMEOUT_S = 1800.0
GUEST_FLOWS = 50  # real new flows of each kind (`xfprobe newflows`) timed on each guest
PS_RUNS = 10  # `xfgate ps` through a running gate, and `--walk`, timed on each guest


def lab_env(prefix: str, domains_file: Path) -> dict[str, str]:
    """The environment of a child that works on lab `prefix` (a copy: nothing is written)."""
    env = dict(os.environ)
    env.update(
        {
            "XFGATE_LAB_PREFIX": prefix,
            "XFGATE_VERDICT_LAB_PREFIX": prefix + "v",
            "XFGATE_DOMAINS": str(domains_file),
        }
    )
    return env


def _run(argv: Sequence[str], env: Mapping[str, str], timeout: float, out: Path) -> str:
    """Runs a child bounded in time; its stdout+stderr go to `out`; returns its stdout."""
    t = time.monotonic()
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=dict(env),
            check=False,
        )
        text, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        err, rc = f"timed out after {timeout:.0f} s", -1
    out.write_text(f"$ {' '.join(argv)}\n# exit {rc}, {time.monotonic() - t:.1f} s\n{text}{err}")
    if rc != 0:
        log.warning("%s: exit %d: %s", " ".join(argv[:4]), rc, err[-400:])
    return text


def _json(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text[text.index("{") :])
    except ValueError:
        return {"error": text[-400:]}
    return doc if isinstance(doc, dict) else {"error": "not a JSON object"}


def lab_figures(
    label: str, env: Mapping[str, str], domain: int, raw: Path, rounds: int, walk_rounds: int
) -> dict[str, Any]:
    """Every scale figure of one lab's domain."""
    py = sys.executable
    figures: dict[str, Any] = {"label": label, "loadavg_before": os.getloadavg()}
    t = time.monotonic()
    ps = _run(
        [py, "-m", "xfgate.cli", "ps", "--domain", str(domain), "--json", "--walk"],
        env,
        600,
        raw / f"{label}-ps.txt",
    )
    figures["ps_end_to_end_s"] = round(time.monotonic() - t, 3)
    ps_doc = _json(ps)
    figures["ps_tasks"] = len(ps_doc.get("tasks", ps_doc.get("processes", [])))
    figures["ps_sockets"] = len(ps_doc.get("sockets", []))
    vmi = [py, "-m", "bench.vmi_bench", "--domain", str(domain), "--rounds", str(rounds)]
    # --ps-runs 0: `xfgate ps` end to end is timed once above, with the counts the table shows.
    vmi += ["--walk-rounds", str(walk_rounds), "--guest-flows", str(GUEST_FLOWS), "--ps-runs", "0"]
    figures["vmi_bench"] = _json(_run(vmi, env, MODULE_TIMEOUT_S, raw / f"{label}-vmi.txt"))
    ps_gate = [py, "-m", "bench.ps_bench", "--domain", str(domain), "--runs", str(PS_RUNS)]
    figures["ps_bench"] = _json(_run(ps_gate, env, 900, raw / f"{label}-ps-gate.txt"))
    rest = [py, "-m", "bench.rest_bench", "--domain", str(domain)]
    figures["rest_bench"] = _json(_run(rest, env, 600, raw / f"{label}-rest.txt"))
    figures["loadavg_after"] = os.getloadavg()
    return figures


def crowd_up(prefix: str, crowd: str, env: Mapping[str, str], raw: Path) -> bool:
    argv = [sys.executable, "-m", "xfgate_lab.cli", "--prefix", prefix, "up", "--crowd", crowd]
    t = time.monotonic()
    _run(argv, env, UP_TIMEOUT_S, raw / f"{prefix}-up.txt")
    print(f"  crowd lab {prefix} up in {time.monotonic() - t:.0f} s", flush=True)
    status = [sys.executable, "-m", "xfgate_lab.cli", "--prefix", prefix, "status"]
    return subprocess.run(status, env=dict(env), capture_output=True, timeout=60).returncode == 0


def crowd_down(prefix: str, env: Mapping[str, str], raw: Path) -> None:
    argv = [sys.executable, "-m", "xfgate_lab.cli", "--prefix", prefix, "down", "--force"]
    _run(argv, env, 300, raw / f"{prefix}-down.txt")


def run_scale(
    out: Path,
    domain: int,
    crowd: str = DEFAULT_CROWD,
    rounds: int = 100,
    walk_rounds: int = 10,
    crowd_prefix: str | None = None,
) -> dict[str, Any]:
    """The current lab's figures, then a crowd lab's (brought up and torn down here)."""
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    here = layout_from_env()
    result: dict[str, Any] = {"crowd": crowd}
    print(f"scale: lab {here.prefix} (current guest)", flush=True)
    small = lab_env(here.prefix, domains_file_from_env())
    result["small"] = lab_figures("small", small, domain, raw, rounds, walk_rounds)
    prefix = crowd_prefix or f"{here.prefix}c"
    cenv = lab_env(prefix, Path(f"/tmp/{prefix}-domains.toml"))
    print(f"scale: crowd lab {prefix} ({crowd}), brought up and torn down here", flush=True)
    try:
        if crowd_up(prefix, crowd, cenv, raw):
            result["crowd_figures"] = lab_figures("crowd", cenv, 1, raw, rounds, walk_rounds)
        else:
            result["crowd_figures"] = {"error": f"crowd lab {prefix} did not come up: see raw/"}
    finally:
        crowd_down(prefix, cenv, raw)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _dig(doc: Mapping[str, Any], *path: str) -> Any:
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v}{unit}"


def _pair(doc: Mapping[str, Any], key: str) -> str:
    p50, p99 = _dig(doc, "vmi_bench", key, "p50_ms"), _dig(doc, "vmi_bench", key, "p99_ms")
    return f"{_fmt(p50)} / {_fmt(p99)} ms" if p50 is not None else "-"


def _flows(kind: str) -> Callable[[Mapping[str, Any]], str]:
    def read(d: Mapping[str, Any]) -> str:
        p50 = _dig(d, "vmi_bench", "guest_new_flows", kind, "p50_ms")
        p99 = _dig(d, "vmi_bench", "guest_new_flows", kind, "p99_ms")
        right = _dig(d, "vmi_bench", "guest_new_flows_attributed", kind)
        return f"{_fmt(p50)} / {_fmt(p99)} ms ({_fmt(right)} attributed)" if p50 else "-"

    return read


def _passed(d: Mapping[str, Any]) -> str:
    p50 = _dig(d, "vmi_bench", "guest_passed_flows", "p50_ms")
    p99 = _dig(d, "vmi_bench", "guest_passed_flows", "p99_ms")
    right = _dig(d, "vmi_bench", "guest_passed_flows_attributed")
    return f"{_fmt(p50)} / {_fmt(p99)} ms ({_fmt(right)} attributed)" if p50 else "-"


def _loads(d: Mapping[str, Any]) -> str:
    before, after = d.get("loadavg_before") or [None], d.get("loadavg_after") or [None]
    return f"{_fmt(before[0])} / {_fmt(after[0])}"


def _ps_gate(d: Mapping[str, Any]) -> str:
    """Through the gate p50 / p99 (its first answer; --walk p50 in the same session)."""
    ps = d.get("ps_bench") or {}
    if "error" in ps or "ps_gate" not in ps:
        return f"- ({str(ps.get('error', 'not run'))[:60]})"
    first = _fmt(ps.get("ps_gate_first_s"), " s")
    walk = _fmt(_dig(ps, "ps_walk", "p50_ms"), " ms")
    p50, p99 = _dig(ps, "ps_gate", "p50_ms"), _dig(ps, "ps_gate", "p99_ms")
    return f"{_fmt(p50)} / {_fmt(p99)} ms (first {first}; --walk p50 {walk})"


Reader = Callable[[Mapping[str, Any]], str]
# (figure, how to read it from one lab's figures, target)
ROWS: tuple[tuple[str, Reader, str], ...] = (
    (
        "guest: processes / sockets (`xfgate ps`)",
        lambda d: f"{d.get('ps_tasks')} / {d.get('ps_sockets')}",
        "2,000 tasks / 20,000 sockets",
    ),
    ("full walk p50 / p99", lambda d: _pair(d, "full_walk"), "-"),
    ("incremental refresh p50 / p99", lambda d: _pair(d, "incremental_refresh"), "-"),
    ("paused walk p50 / p99", lambda d: _pair(d, "pause_with_walk"), "p99 <= 5 ms"),
    ("bare QMP stop+cont p50 / p99", lambda d: _pair(d, "pause_bare_stop_cont"), "-"),
    (
        "`xfgate ps --json --walk` end to end (no gate asked)",
        lambda d: _fmt(d.get("ps_end_to_end_s"), " s"),
        "<= 0.3 s",
    ),
    ("`xfgate ps --json` through a running gate p50 / p99", _ps_gate, "<= 0.3 s"),
    ("lookup of a known sock p50 / p99", lambda d: _pair(d, "lookup"), "-"),
    (
        "new-sock lookup p50 / p99",
        lambda d: _pair(d, "new_sock_lookup"),
        "p50 <= 1, p99 <= 5 ms, <= 2x small",
    ),
    (
        "new socks answered 'holders not known'",
        lambda d: _fmt(_dig(d, "vmi_bench", "new_sock_unknown")),
        "-",
    ),
    (
        "new-sock answers that disagree with the walk",
        lambda d: _fmt(_dig(d, "vmi_bench", "new_sock_disagreements")),
        "0",
    ),
    ("first packet: new outgoing TCP connection", _flows("tcp_out"), "p50 <= 1, p99 <= 5 ms"),
    ("first packet: SYN to a new listener (incoming)", _flows("tcp_listen"), "same"),
    ("first packet: accepted end of an incoming connection", _flows("tcp_in"), "same"),
    ("first packet: UDP datagram of a new socket", _flows("udp"), "same"),
    ("first packet: UDP socket received by SCM_RIGHTS since the walk", _passed, "same"),
    ("blocked uid's new-sock lookup p50 / p99", lambda d: _pair(d, "blocked_new_sock_lookup"), "-"),
    (
        "first-packet decisions/s, owners from guest memory",
        lambda d: _fmt(_dig(d, "vmi_bench", "decisions_per_s"), " /s"),
        ">= 20,000 /s",
    ),
    (
        "same, per CPU-second of the deciding thread's process",
        lambda d: _fmt(_dig(d, "vmi_bench", "decisions_per_cpu_s"), " /s"),
        ">= 20,000 /s",
    ),
    (
        "gate CPU at rest (% of one core)",
        lambda d: _fmt(_dig(d, "rest_bench", "gate_cpu_percent_of_one_core"), " %"),
        "<= 1 %",
    ),
    ("host load average before / after", lambda d: _loads(d), "-"),
)


def render(result: Mapping[str, Any]) -> str:
    small = result.get("small") or {}
    crowd = result.get("crowd_figures") or {}
    lines = [
        f"### Scale: 51-task guest vs crowd {result.get('crowd')} (one run, "
        f"{_fmt(result.get('elapsed_s'), ' s')})",
        "",
        f"| figure | 51-task guest | crowd {result.get('crowd')} | target |",
        "|---|---|---|---|",
    ]
    if "error" in crowd:
        lines.insert(2, f"crowd: {crowd['error']}")
    for name, read, target in ROWS:
        lines.append(f"| {name} | {read(small)} | {read(crowd)} | {target} |")
    return "\n".join(lines)
