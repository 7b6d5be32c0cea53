"""The demo behind `./demo.sh`: the operator's story on the built-in lab guest.

1. bring the demo domain up (`xfgate-lab up`);
2. look inside it from outside (`xfgate ps --domain 1`): uid 1001's `spray` is attacking;
3. stop that user at once (`xfgate run --domain 1 --block-uid 1001`), and show that the
   attack stops at the client while the guest's web servers still answer;
4. block another user live (`xfgate block --domain 1 --uid 0`): port 80 dies, 8080 lives;
5. stop the gate (its rules stay in the kernel), then release the domain;
6. run xfgate as a service (`xfgate serve`, what the systemd unit starts): block the attacker
   for a limited time (`xfgate block --domain 1 --uid 1001 --for 30s`), show its metrics,
   restart the service under attack (nothing gets out), and watch the block expire;
7. tear the lab down.

Every step prints the command an operator would type. The lab is left up with --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xfgate_lab.gate_process import XFGATE, XFGATE_LAB, GateProcess, gate_process
from xfgate_lab.lab import client_http_get, read_peer_stats
from xfgate_lab.layout import DEFAULT_PREFIX, LabLayout, guest_v4, layout_from_env


def say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def command(name: str, argv: Sequence[str], args: Sequence[str], check: bool = True) -> str:
    line = f"{name} {' '.join(args)}"
    print(f"$ {line}", flush=True)
    proc = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    print(out.rstrip(), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: `{line}` failed with exit {proc.returncode}")
    return out


def xfgate(*args: str, check: bool = True) -> str:
    """The product's command, as an operator types it."""
    return command("xfgate", XFGATE, args, check)


def xfgate_lab(layout: LabLayout, *args: str, check: bool = True) -> str:
    """The harness's command (the demo lab); `--prefix` only for a private lab."""
    prefix = [] if layout.prefix == DEFAULT_PREFIX else ["--prefix", layout.prefix]
    return command("xfgate-lab", XFGATE_LAB, [*prefix, *args], check)


def attack_count(layout: LabLayout) -> tuple[int, int]:
    stats = read_peer_stats(layout)
    return int(stats.get("tcp2222_accepted", 0)), int(stats.get("udp5353_datagrams", 0))


def watch_attack(layout: LabLayout, seconds: float) -> tuple[int, int]:
    """How many attack connections/datagrams reached the client in `seconds`. The peers write
    their counters once a second: wait for a fresh write before taking the first reading."""
    time.sleep(2.0)
    tcp0, udp0 = attack_count(layout)
    time.sleep(seconds)
    tcp1, udp1 = attack_count(layout)
    return tcp1 - tcp0, udp1 - udp0


def show_services(layout: LabLayout) -> None:
    guest = str(guest_v4(1))
    for port in (80, 8080):
        body = client_http_get(layout, guest, port, timeout=2.0)
        state = "answers" if body is not None else "NO ANSWER"
        print(f"  client -> {guest}:{port}: {state}", flush=True)


def show_verdicts(verdict_log: Path, limit: int = 4) -> None:
    drops = []
    for line in verdict_log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("verdict") == "drop":
            drops.append(rec)
    print(f"  {len(drops)} drop decisions logged; the first ones:", flush=True)
    for rec in drops[:limit]:
        keys = ("direction", "proto", "src", "sport", "dst", "dport", "pid", "uid", "comm")
        print("   ", {k: rec.get(k) for k in keys}, rec.get("reason"), flush=True)


BLOCK_SECONDS = 30


def start_service(workdir: Path, n: int) -> GateProcess:
    argv = ["serve", "--policy", str(workdir / "policy.toml"), "--metrics", "127.0.0.1:0"]
    argv += ["--audit-log", str(workdir / "audit.jsonl")]
    print(f"$ xfgate {' '.join(argv)} &    # what `systemctl start xfgate` runs", flush=True)
    out = workdir / f"serve-{n}.log"
    with out.open("wb") as f:
        proc = subprocess.Popen([*XFGATE, *argv], stdout=f, stderr=subprocess.STDOUT)
    service = GateProcess(proc, out, ("1",))
    service.wait_ready()
    print(f"  service pid {service.pid} ready", flush=True)
    return service


def service_status() -> dict[str, Any]:
    proc = subprocess.run([*XFGATE, "status", "--json"], capture_output=True, text=True, timeout=60)
    doc: dict[str, Any] = json.loads(proc.stdout) if proc.returncode == 0 else {}
    return doc


def show_metrics(address: str) -> None:
    print(f"$ curl -s http://{address}/metrics | grep ...", flush=True)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ("xfgate_decisions_total", "xfgate_decision_latency_seconds_count", "xfgate_walks")
    for line in text.splitlines():
        if line.startswith(wanted) or line.startswith(("xfgate_domains", "xfgate_queue_drops")):
            print(f"  {line}", flush=True)


def service_story(layout: LabLayout, workdir: Path) -> None:
    say("7. xfgate as a service: one process for every domain, its policy in a file")
    service = start_service(workdir, 1)
    try:
        xfgate(
            "block",
            "--domain",
            "1",
            "--uid",
            "1001",
            "--for",
            f"{BLOCK_SECONDS}s",
            "--reason",
            "spray attacks 198.18.0.1",
        )
        until = time.time() + BLOCK_SECONDS
        tcp, udp = watch_attack(layout, 4)
        print(f"  while blocked, spray got out {tcp} connections and {udp} datagrams")
        xfgate("status")
        show_metrics(service_status()["service"]["metrics"])
        say("8. Restart the service under attack: the kernel keeps enforcing meanwhile")
        print(
            f"$ systemctl restart xfgate    # here: kill -TERM {service.pid}; xfgate serve",
            flush=True,
        )
        tcp0, udp0 = attack_count(layout)
        service.stop(signal.SIGTERM)
        time.sleep(3)
        service = start_service(workdir, 2)
        time.sleep(2.5)  # the peers write their counters once a second
        tcp1, udp1 = attack_count(layout)
        print(
            f"  across the restart, spray got out {tcp1 - tcp0} connections and"
            f" {udp1 - udp0} datagrams"
        )
        print(f"  the rule is still there: {service_status()['domains'][0]['rules']}")
        say(f"9. The block ends at its time ({BLOCK_SECONDS} s after it was set)")
        time.sleep(max(0.0, until - time.time() + 1.5))
        print((workdir / "audit.jsonl").read_text().rstrip(), flush=True)
        tcp, udp = watch_attack(layout, 4)
        print(f"  after the expiry, spray got out {tcp} connections and {udp} datagrams")
    finally:
        print(f"$ kill -TERM {service.pid}", flush=True)
        service.stop(signal.SIGTERM)
        xfgate("cleanup", "--domain", "1", check=False)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo.sh", description=__doc__)
    ap.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (it builds namespaces, a bridge and a QEMU guest)")
    layout = layout_from_env()
    workdir = Path(tempfile.mkdtemp(prefix="xfgate-demo-"))
    try:
        say("1. The demo domain: a Debian kernel under QEMU behind vif1.0 on bridge xenbr0")
        xfgate_lab(layout, "up")
        say("2. Inside domain 1, seen from the host by reading its kernel memory")
        xfgate("ps", "--domain", "1", "--uid", "1001")
        xfgate("ps", "--domain", "1")
        tcp, udp = watch_attack(layout, 4)
        print(f"  in 4 s the client received {tcp} connections and {udp} datagrams from spray")
        say("3. Stop user 1001 at once, without logging into the guest")
        verdicts = workdir / "verdicts.jsonl"
        run_args = ["--domain", "1", "--block-uid", "1001", "--log", str(verdicts)]
        print(f"$ xfgate run {' '.join(run_args)} &", flush=True)
        with gate_process(run_args, workdir / "gate.log", release=False) as gate:
            print(f"  gate pid {gate.pid} ready", flush=True)
            tcp, udp = watch_attack(layout, 4)
            print(f"  in 4 s the client received {tcp} connections and {udp} datagrams from spray")
            show_services(layout)
            show_verdicts(verdicts)
            say("4. Block root's processes too, live (the running gate takes the change)")
            xfgate("block", "--domain", "1", "--uid", "0")
            show_services(layout)
            xfgate("unblock", "--domain", "1", "--uid", "0")
            xfgate("status", "--domain", "1")
            say("5. Stop the gate: stopping is not releasing, its rules stay in the kernel")
            print(f"$ kill -INT {gate.pid}", flush=True)
        xfgate("rules", "--domain", "1")
        tcp, udp = watch_attack(layout, 4)
        print(f"  in 4 s the client received {tcp} connections and {udp} datagrams from spray")
        say("6. Release the domain: every chain, set and mark the gate added goes away")
        xfgate("cleanup", "--domain", "1")
        xfgate("rules", "--domain", "1")
        service_story(layout, workdir)
    finally:
        if not args.keep:
            say("Tearing the lab down")
            xfgate_lab(layout, "down", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
