"""Verdict engine timings, printed as JSON.

    python -m bench.verdict_bench [--rounds 100000] [--netns] [--rates 2000,5000,...]

- decision: Engine.evaluate() of one TCP packet, cache hit (the per-packet cost once a flow's
  owner is known) and parse only; in-process, a static owner table, no I/O.
- netns (root): a real gate (static owner table) in a private namespace lab; a UDP sender
  in the "guest" offers one flow at fixed rates (2 s per step, at most 100k pkt/s), with
  `--no-fastpath` (every packet through NFQUEUE and Python) and with the fast path (the flow
  settles in conntrack after its first packet). Per step: packets queued to Python, dropped
  by the kernel because the queue was full, arrived at the client.
Bounded in count and time; traffic stays inside the lab's namespaces (198.18.9.0/24).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from ipaddress import ip_address
from pathlib import Path
from typing import Any

from xfgate.flow import Flow, GuestSocket, GuestView, Owner, Ownership, Via
from xfgate.inet import IPProto
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine
from xfgate.verdict.packet import parse
from xfgate.verdict.policy import compile_policy
from xfgate_lab import netlab
from xfgate_lab.gate_process import gate_process


class _Table:
    def __init__(self) -> None:
        self.owned = Ownership((Owner(200, 1000, 1000, "httpd"),), 1000, "LISTEN", Via.LISTENER)

    def lookup(self, flow: Flow) -> Ownership | None:
        return self.owned

    def sockets(self) -> Sequence[GuestSocket]:
        return []

    def view(self) -> GuestView:
        return GuestView((), (), (), complete=True)

    def generation(self) -> int:
        return 1


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    return {
        "n": len(s),
        "p50_us": round(s[len(s) // 2] / 1000, 2),
        "p99_us": round(s[int(len(s) * 0.99)] / 1000, 2),
        "mean_us": round(statistics.fmean(s) / 1000, 2),
    }


def bench_decision(rounds: int) -> dict[str, Any]:
    # Built with raw bytes (no scapy): an IPv4 TCP ACK, client -> guest:8080.
    src, dst = ip_address("198.18.9.1").packed, ip_address("198.18.9.2").packed
    ip = bytes([0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, IPProto.TCP, 0, 0]) + src + dst
    tcp = (5000).to_bytes(2, "big") + (8080).to_bytes(2, "big") + bytes(8) + b"\x50\x10" + bytes(6)
    payload = ip + tcp
    engine = Engine(9, {7: "vif9.0"}, _Table(), compile_policy(uids=[1001]), OwnerCache())
    engine.evaluate(payload, 3, 7)  # fill the cache
    hit: list[int] = []
    parse_only: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        engine.evaluate(payload, 3, 7)
        t1 = clock()
        parse(payload)
        t2 = clock()
        hit.append(t1 - t0)
        parse_only.append(t2 - t1)
    return {"cache_hit": percentiles_us(hit), "parse_only": percentiles_us(parse_only)}


SENDER = """
import socket, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{guest}", 40000))
t0 = time.monotonic()
sent = 0
total = int(rate * seconds)
while sent < total:
    due = t0 + sent / rate
    now = time.monotonic()
    if now - t0 > seconds + 5:
        break
    if now < due:
        time.sleep(min(due - now, 0.01))
        continue
    try:
        s.sendto(b"x" * 32, ("{client}", 5354))
        sent += 1
    except OSError:
        time.sleep(0.001)
print(sent, time.monotonic() - t0)
"""
RATES = (2_000, 5_000, 10_000, 20_000, 40_000)
STEP_SECONDS = 2.0


def _status(lab: netlab.NetLab) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "xfgate.cli", "status", "--domain", "9", "--json"],
        capture_output=True,
        text=True,
        env=lab.env(),
        timeout=30,
    ).stdout
    result: dict[str, Any] = json.loads(out)[0]
    return result


def _arrived(lab: netlab.NetLab) -> int:
    out = lab.ns(lab.client, ["iptables-legacy", "-nvxL", "INPUT"])
    return sum(int(ln.split()[0]) for ln in out.splitlines() if "dpt:5354" in ln)


def bench_netns(rates: Sequence[int]) -> dict[str, Any]:
    """Per mode and offered rate (UDP, one flow, STEP_SECONDS each): what Python saw, what
    the kernel dropped because the queue was full (fail-closed), what reached the client."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="xfvbench") as tmp:
        lab = netlab.create(f"xfvb{os.getpid() % 10000}", Path(tmp))
        try:
            owners = Path(tmp) / "owners.json"
            owners.write_text(
                json.dumps(
                    {
                        "entries": [
                            {
                                "proto": "udp",
                                "rport": 5354,
                                "owners": [{"pid": 200, "uid": 1000, "comm": "sender"}],
                            }
                        ]
                    }
                )
            )
            lab.ns(lab.client, ["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "5354"])
            sender = SENDER.format(guest=netlab.GUEST4, client=netlab.CLIENT4)
            for name, extra in (("no_fastpath", ["--no-fastpath"]), ("fastpath", [])):
                steps = []
                with gate_process(
                    ["--domain", "9", *extra],
                    Path(tmp) / f"gate-{name}.out",
                    30,
                    owners_json=owners,
                    env=lab.env(),
                ):
                    for rate in rates:
                        lab.ns(lab.client, ["iptables-legacy", "-Z", "INPUT"])
                        lab.ns(lab.dom0, ["conntrack", "-F"], check=False)
                        load = os.getloadavg()[0]
                        before = _status(lab)
                        out = lab.ns(
                            lab.guest,
                            [sys.executable, "-c", sender, str(rate), str(STEP_SECONDS)],
                            timeout=60,
                        )
                        sent, seconds = int(out.split()[0]), float(out.split()[1])
                        time.sleep(1.0)
                        after = _status(lab)
                        queued = after["stats"]["packets"] - before["stats"]["packets"]
                        dropped = after["queue"].get("queue_dropped", 0) - before["queue"].get(
                            "queue_dropped", 0
                        )
                        steps.append(
                            {
                                "offered_per_s": rate,
                                "sent": sent,
                                "achieved_send_per_s": round(sent / seconds, 1),
                                "queued_to_python": queued,
                                "kernel_queue_dropped": dropped,
                                "netlink_dropped": after["queue"].get("user_dropped", 0),
                                "arrived_at_client": _arrived(lab),
                                "load_1min": load,
                            }
                        )
                    results[name] = {
                        "steps": steps,
                        "engine_avg_us": _status(lab)["stats"]["latency_us_avg"],
                        "max_rate_without_loss": max(
                            [
                                s["offered_per_s"]
                                for s in steps
                                if s["kernel_queue_dropped"] == 0
                                and s["arrived_at_client"] == s["sent"]
                            ]
                            or [0]
                        ),
                    }
        finally:
            netlab.destroy(lab)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="verdict_bench")
    p.add_argument("--rounds", type=int, default=100_000)
    p.add_argument("--netns", action="store_true", help="NFQUEUE throughput in a private lab")
    p.add_argument("--rates", default=",".join(map(str, RATES)), help="offered pkt/s steps")
    args = p.parse_args(argv)
    report: dict[str, Any] = {"load_1min": os.getloadavg()[0]}
    report["decision"] = bench_decision(min(args.rounds, 1_000_000))
    if args.netns:
        rates = [min(int(r), 100_000) for r in args.rates.split(",")]
        report["netns"] = bench_netns(rates)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
