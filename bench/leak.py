"""Leak benchmark: a blocked guest user opens N new connections; count, on the client side, how
many of their packets got out. The thesis's polling leaves a window between polls; a per-packet
gate should let none through (its first SYN included)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.gate import running_gate
from xfgate.config import DomainConfig
from xfgate_lab.layout import layout_from_env

CLIENT_ADDR = "198.18.0.1"
LEAK_PORT = 2223  # nothing listens: each attempt is a SYN (answered by RST if it gets out)
CHAIN = "XFBENCH-LEAK"
BLOCKED_USER = "mallory"  # uid 1001 in the lab guest
BLOCK = ("--block-uid", "1001")


@dataclass(frozen=True)
class LeakResult:
    config: str
    connections: int
    packets_out: int
    syns_out: int


def counting_rules(guest_addr: str) -> list[list[str]]:
    """iptables-legacy argv (client netns) counting packets and SYNs from the guest to LEAK_PORT."""
    match = ["-s", guest_addr, "-p", "tcp", "--dport", str(LEAK_PORT)]
    return [
        ["-N", CHAIN],
        ["-A", CHAIN, *match, "--syn", "-m", "comment", "--comment", "syn"],
        ["-A", CHAIN, *match, "-m", "comment", "--comment", "all"],
        ["-I", "INPUT", "1", "-j", CHAIN],
    ]


def parse_counters(listing: str) -> tuple[int, int]:
    """(all packets, SYNs) from `iptables -L CHAIN -v -x -n`."""
    syn = total = 0
    for line in listing.splitlines():
        m = re.match(r"\s*(\d+)\s+\d+\s", line)
        if not m:
            continue
        if "/* syn */" in line:
            syn = int(m.group(1))
        elif "/* all */" in line:
            total = int(m.group(1))
    return total, syn


def _ipt(*args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", layout_from_env().client_netns, "iptables-legacy", "-w", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"iptables-legacy {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _remove_rules() -> None:
    _ipt("-D", "INPUT", "-j", CHAIN, check=False)
    _ipt("-F", CHAIN, check=False)
    _ipt("-X", CHAIN, check=False)


def attempts_script(n: int) -> str:
    """Guest shell: the blocked user tries n fresh connections, ~3 per second."""
    inner = (
        f"i=0; while [ $i -lt {n} ]; do timeout 1 nc {CLIENT_ADDR} {LEAK_PORT} </dev/null; "
        "i=$((i+1)); sleep 0.3; done"
    )
    return f"su -s /bin/sh {BLOCKED_USER} -c '{inner}' >/dev/null 2>&1; echo done"


def run_leak(dom: DomainConfig, config: str, n: int, raw: Path) -> LeakResult:
    guest = dom.addresses[0]
    _remove_rules()
    for rule in counting_rules(guest):
        _ipt(*rule)
    try:
        with running_gate(dom.id, config, BLOCK, raw / f"leak-{config}.gate.log"):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "xfgate_lab.cli",
                    "exec",
                    "--domain",
                    str(dom.id),
                    "--timeout",
                    str(int(n * 2 + 30)),
                    "--",
                    attempts_script(n),
                ],
                capture_output=True,
                text=True,
                timeout=n * 2 + 60,
            )
        total, syns = parse_counters(_ipt("-L", CHAIN, "-v", "-x", "-n"))
    finally:
        _remove_rules()
    return LeakResult(config=config, connections=n, packets_out=total, syns_out=syns)
