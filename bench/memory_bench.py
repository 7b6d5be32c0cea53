"""Memory per domain (issue 10): the private memory of one `xfgate run` serving 1..N lab domains.

    .venv/bin/python -m bench.memory_bench --domains 4     # needs `xfgate-lab up --domains 4`

For each n in 1..N a gate is started with `--domain 1 .. --domain n --block-uid 1001`, left to
settle (its first walks and refreshes), and its /proc/PID/smaps is summed: the figure is
Private_Clean + Private_Dirty of every mapping **except the guest-RAM mappings** — a mapping
whose file is a served domain's RAM file (`[domain.memory] path` of the domains file: the
qemu-shm RAM file, a raw or ELF dump). Those pages are the guest's, shared with QEMU (pages
QEMU has not touched yet would show as the gate's Private_Clean); they are reported beside it
(their Rss), never in it. A domain read through the qemu-process backend maps nothing (it reads
/proc/QEMU/mem), so nothing is left out for it. The gate runs with the packaged unit's
interpreter setting (`SETUPTOOLS_USE_DISTUTILS`, read from packaging/systemd/xfgate.service), as
an operator's service would; `--as-shell` measures it as a shell starts it. Prints one JSON
document.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xfgate.config import get_domain
from xfgate_lab.gate_process import gate_process
from xfgate_lab.layout import domains_file_from_env

UNIT = Path(__file__).parent.parent / "packaging/systemd/xfgate.service"
UNIT_INTERPRETER_VARS = ("SETUPTOOLS_USE_DISTUTILS",)  # not its paths: the lab's stay
SETTLE_S = 10.0  # >= a few refresh periods (2 s) after `gate ready`
MAX_SMAPS_BYTES = 64 << 20  # a bound on what is read of one smaps file


@dataclass(frozen=True)
class SmapsTotals:
    """kB, summed over the mappings of one process."""

    private_kb: int  # Private_Clean + Private_Dirty, guest-RAM mappings left out
    rss_kb: int  # guest-RAM mappings left out
    pss_kb: int  # guest-RAM mappings left out
    anonymous_kb: int
    guest_ram_rss_kb: int  # the left-out guest-RAM mappings' Rss
    guest_ram_private_kb: int  # ... and their Private_* (pages only the gate has touched)
    guest_ram_mappings: int


def _mapping_path(header: str) -> str:
    parts = header.split(maxsplit=5)
    path = parts[5].strip() if len(parts) > 5 else ""
    return path.removesuffix(" (deleted)")


def _is_header(line: str) -> bool:
    first = line.split(maxsplit=1)[0] if line.strip() else ""
    lo, sep, hi = first.partition("-")
    return bool(sep) and all(c in "0123456789abcdef" for c in lo + hi) and bool(lo and hi)


def parse_smaps(text: str, guest_ram: set[str]) -> SmapsTotals:
    """Sums /proc/PID/smaps; mappings of a file in `guest_ram` are counted apart."""
    tot = {"private": 0, "rss": 0, "pss": 0, "anon": 0, "g_rss": 0, "g_priv": 0, "g_n": 0}
    is_guest = False
    for line in text.splitlines():
        if _is_header(line):
            is_guest = _mapping_path(line) in guest_ram
            tot["g_n"] += is_guest
            continue
        key, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) != 2 or fields[1] != "kB" or not fields[0].isdigit():
            continue
        kb = int(fields[0])
        private = key in ("Private_Clean", "Private_Dirty")
        if is_guest:
            tot["g_rss"] += kb if key == "Rss" else 0
            tot["g_priv"] += kb if private else 0
            continue
        tot["private"] += kb if private else 0
        tot["rss"] += kb if key == "Rss" else 0
        tot["pss"] += kb if key == "Pss" else 0
        tot["anon"] += kb if key == "Anonymous" else 0
    return SmapsTotals(
        private_kb=tot["private"],
        rss_kb=tot["rss"],
        pss_kb=tot["pss"],
        anonymous_kb=tot["anon"],
        guest_ram_rss_kb=tot["g_rss"],
        guest_ram_private_kb=tot["g_priv"],
        guest_ram_mappings=tot["g_n"],
    )


def read_smaps(pid: int) -> str:
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        return f.read(MAX_SMAPS_BYTES)


def guest_ram_paths(domains: Sequence[int], domains_file: Path) -> set[str]:
    paths = set()
    for d in domains:
        path = get_domain(d, domains_file).memory.path
        if path:
            paths.add(str(path))
    return paths


def unit_environment(unit_text: str) -> dict[str, str]:
    """The unit's `Environment=` settings that change the interpreter (UNIT_INTERPRETER_VARS)."""
    found = {}
    for line in unit_text.splitlines():
        if line.startswith("Environment="):
            name, _, value = line.removeprefix("Environment=").partition("=")
            if name in UNIT_INTERPRETER_VARS:
                found[name] = value
    return found


def measure(
    domains: Sequence[int], out: Path, settle_s: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One gate serving `domains`: its smaps totals after `settle_s` seconds of running."""
    run_args = [a for d in domains for a in ("--domain", str(d))] + ["--block-uid", "1001"]
    tag = "-".join(str(d) for d in domains)
    ram = guest_ram_paths(domains, domains_file_from_env())
    with gate_process(run_args, out / f"memory-{tag}.gate.log", env=env) as gate:
        time.sleep(settle_s)
        totals = parse_smaps(read_smaps(gate.pid), ram)
    return {"domains": list(domains), **asdict(totals)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.memory_bench", description=__doc__)
    ap.add_argument("--domains", type=int, default=4, help="measure 1..N domains")
    ap.add_argument("--settle", type=float, default=SETTLE_S)
    ap.add_argument("--out", type=Path, default=Path("/tmp"))
    ap.add_argument("--as-shell", action="store_true", help="without the unit's settings")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    unit = {} if args.as_shell else unit_environment(UNIT.read_text())
    env = {**os.environ, **unit}
    rows = [
        measure(range(1, n + 1), args.out, args.settle, env) for n in range(1, args.domains + 1)
    ]
    mb = [r["private_kb"] / 1024 for r in rows]
    result = {
        "rows": rows,
        "private_mb": mb,
        "first_domain_mb": mb[0] if mb else None,
        "per_further_domain_mb": [b - a for a, b in itertools.pairwise(mb)],
        "targets": {"first_domain_mb": 64, "per_further_domain_mb": 16},
        "unit_environment": unit,
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
