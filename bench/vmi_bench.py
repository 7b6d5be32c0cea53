"""Introspection timings on a live lab guest, printed as JSON.

    python -m bench.vmi_bench --domain 1 [--rounds 200] [--profile FILE]

- full_walk: GuestIntrospector.walk() (every task, fd table and inet socket), unpaused;
- backends: full_walk and lookup of the same guest through each memory backend it offers in
  the same run (a shared-file guest: the RAM file, and the QEMU process's memory);
- lookup: GuestIntrospector.lookup() of every socket's flow with a warm owner index (the
  verdict engine's cache-miss path);
- new_sock_lookup: GuestIntrospector.lookup() of a socket the owner index does not know yet (the
  first packet of a new flow: before, a full walk; now the holder resolver, xfgate.vmi.holders),
  each answer checked against the full walk's holders (`new_sock_disagreements`), also split by
  the flow it stands for (`new_sock_by_kind`: tcp_out, tcp_in, tcp_listen, udp, see
  new_sock_kind; the resolver's counters are in `crosscheck`);
- guest_new_flows (`--guest-flows N`, a lab guest): real new flows of an existing process,
  first-packet lookup latency per kind (`xfprobe newflows` in the guest: started, the guest
  walked, then it opens N new listeners (the SYN of an incoming connection), N loopback TCP
  connections (the outgoing end and the accepted, incoming end) and N UDP sockets; each looked
  up once, as the gate's first packet of that flow would be, `--block-uid 1001` watched);
- decisions_per_s: Engine.evaluate() of the first packet of distinct flows (every one a cache
  miss) from the guest's IPv4 TCP and UDP sockets, owners from guest memory (hash tables and
  the walk's index), on one core;
- pause: the guest stopped over QMP around one full walk (stop, walk, cont), as the thesis's
  xFilter paused per poll (19 ms average, 52 ms max there), and the bare stop+cont round trip.
Bounded: `rounds` iterations of each, nothing else runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

from xfgate.config import DomainConfig, MemoryConfig, get_domain
from xfgate.errors import XfgateError
from xfgate.flow import Flow
from xfgate.inet import IPProto
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine
from xfgate.verdict.policy import compile_policy
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.linux import InetSock, WalkBounds
from xfgate.vmi.memory import PhysicalMemory
from xfgate.vmi.monitor import open_monitor
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import paused
from xfgate_lab.cli import guest_exec
from xfgate_lab.layout import (
    LabLayout,
    cache_dir_from_env,
    domains_file_from_env,
    layout_from_env,
)


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean/max in milliseconds of samples in seconds."""
    ordered = sorted(samples)
    if not ordered:
        return {}

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))] * 1000

    return {
        "n": len(ordered),
        "p50_ms": round(pct(0.5), 3),
        "p99_ms": round(pct(0.99), 3),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }


def walk_and_lookup(
    domain: DomainConfig,
    profile: Profile,
    rounds: int,
    memory: PhysicalMemory | None = None,
    walk_rounds: int | None = None,
) -> tuple[dict[str, Any], GuestIntrospector]:
    """Full walk and targeted lookup timings of one backend (the domain's own, or `memory`)."""
    out: dict[str, Any] = {}
    # A walk bound that holds a crowded guest (the default 2 s does not: 2-4 s there).
    bounds = WalkBounds(seconds=30.0)
    guest = GuestIntrospector(domain, profile, allow_pause=False, memory=memory, bounds=bounds)
    out["backend"] = guest.memory.name
    t0 = time.perf_counter()
    first = guest.walk()
    out["first_walk_incl_kaslr_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    out["kaslr_method"] = guest.boot().location.method
    out["tasks"], out["sockets"] = len(first.tasks), len(first.sockets)
    walks, incomplete = [], 0
    for _ in range(walk_rounds or rounds):
        t = time.perf_counter()
        result = guest.walk()
        walks.append(time.perf_counter() - t)
        incomplete += not result.complete
    out["full_walk"] = summary_ms(walks)
    out["full_walk_incomplete"] = incomplete
    out.update(incremental_refreshes(guest, walk_rounds or rounds))
    flows = [
        Flow(s.sock.proto, s.sock.local, s.sock.lport, s.sock.remote, s.sock.rport)
        for s in guest.walk().sockets
    ]
    lookups, misses = [], 0
    for i in range(rounds):
        flow = flows[i % len(flows)]
        t = time.perf_counter()
        own = guest.lookup(flow)
        lookups.append(time.perf_counter() - t)
        misses += own is None
    out["lookup"] = summary_ms(lookups)
    out["lookup_misses"] = misses
    return out, guest


def incremental_refreshes(guest: GuestIntrospector, rounds: int) -> dict[str, Any]:
    """The gate's periodic refresh (GuestIntrospector.refresh_view) right after a full walk,
    watching uid 1001's tasks as `--block-uid 1001` does: time per refresh, how many found
    nothing changed (the last view handed back), the last one's decode counts."""
    guest.crosscheck_seconds = 3600.0  # no cross-check walk inside the timed rounds
    guest.refresh_view()
    samples: list[float] = []
    before = guest.crosscheck.refresh_unchanged
    for _ in range(rounds):
        t = time.perf_counter()
        guest.refresh_view(lambda o: o.uid == 1001)
        samples.append(time.perf_counter() - t)
    return {
        "incremental_refresh": summary_ms(samples),
        "incremental_refresh_unchanged": guest.crosscheck.refresh_unchanged - before,
        "incremental_refresh_counts": dict(guest.crosscheck.last_refresh),
    }


NEW_FLOWS_PORT = 26000  # the crowd's ports are 20000 + worker (xfgate_lab/guest/crowd.c)


def guest_new_flows(
    guest: GuestIntrospector, n: int, layout: LabLayout | None = None
) -> dict[str, Any]:
    """First-packet lookups of flows a process the last walk saw opens after it (see the module
    doc): per kind p50/p99, how many answered with that process as a holder, all known. The
    guest is `layout`'s (default: $XFGATE_LAB_PREFIX's lab)."""
    layout = layout or layout_from_env()
    domain = guest.domain.id
    t = time.perf_counter()
    guest.walk()
    delay_ms = int((time.perf_counter() - t) * 3000) + 3000  # the next walk ends before it
    start = (
        f"setsid xfprobe newflows {NEW_FLOWS_PORT} {n} {delay_ms} 600"
        " > /tmp/xfnewflows.log 2>&1 < /dev/null & sleep 1; cat /tmp/xfnewflows.log"
    )
    out = guest_exec(layout, domain, start, timeout=20).output.decode(errors="replace")
    m = re.search(r"pid (\d+) waiting", out)
    if m is None:
        return {"guest_new_flows_error": out.strip()[-200:]}
    pid = int(m.group(1))
    try:
        result = guest.walk()
        if not any(t.pid == pid for t in result.tasks) or not result.complete:
            return {"guest_new_flows_error": "the walk did not see the probe (delay too short)"}
        for _ in range(int(delay_ms / 1000) + 60):
            time.sleep(1.0)
            log = guest_exec(layout, domain, "cat /tmp/xfnewflows.log", timeout=10).output
            if b"ready" in log:
                break
        else:
            return {"guest_new_flows_error": "the probe did not get ready"}
        guest.watch = lambda o: 1001 in (o.uid, o.euid)
        here, lo = ip_address("198.18.1.1"), ip_address("127.0.0.1")
        out_side = ip_address("198.18.0.50")
        p = NEW_FLOWS_PORT
        samples: dict[str, list[float]] = {}
        right: dict[str, int] = {}
        cc = guest.crosscheck  # getattr: the same bench runs against code without them
        by_count, tables = getattr(cc, "by_count", 0), getattr(cc, "tables_read", 0)
        for i in range(n):
            flows = {
                "tcp_listen": Flow(IPProto.TCP, here, p + 1000 + i, out_side, 40000 + i),
                "tcp_out": Flow(IPProto.TCP, lo, p + 1 + i, lo, p),
                "tcp_in": Flow(IPProto.TCP, lo, p, lo, p + 1 + i),
                "udp": Flow(IPProto.UDP, lo, p + 2000 + i, lo, p),
            }
            for kind, flow in flows.items():
                t = time.perf_counter()
                own = guest.lookup(flow)
                samples.setdefault(kind, []).append(time.perf_counter() - t)
                ok = own is not None and own.holders_known and pid in {o.pid for o in own.owners}
                right[kind] = right.get(kind, 0) + ok
        tables = getattr(cc, "tables_read", 0) - tables
        by_count = getattr(cc, "by_count", 0) - by_count
    finally:
        guest.watch = None
        guest_exec(layout, domain, f"kill {pid}", timeout=10)
    return {
        "guest_new_flows": {k: summary_ms(v) for k, v in samples.items()},
        "guest_new_flows_attributed": right,
        "guest_new_flows_by_count": by_count,
        "guest_new_flows_tables_read": tables,
    }


def run(
    domain_id: int,
    rounds: int,
    profile_path: str | None,
    walk_rounds: int | None = None,
    guest_flows: int = 0,
) -> dict[str, Any]:
    domain = get_domain(domain_id, domains_file_from_env())
    profile = load_domain_profile(domain, profile_path, cache_dir_from_env())
    out: dict[str, Any] = {"domain": domain_id, "rounds": rounds, "loadavg": os.getloadavg()}
    main, guest = walk_and_lookup(domain, profile, rounds, walk_rounds=walk_rounds)
    out.update(main)
    # The same guest through the other backend in the same run: a shared-file guest's QEMU is
    # also a process whose RAM can be read with process_vm_readv.
    backends = {domain.memory.backend: main}
    if domain.memory.backend == "qemu-shm" and domain.qmp is not None:
        other = replace(domain, memory=MemoryConfig("qemu-process", ""))
        try:
            backends["qemu-process"], g2 = walk_and_lookup(
                other, profile, rounds, walk_rounds=walk_rounds
            )
            g2.close()
        except XfgateError as e:
            backends["qemu-process"] = {"error": str(e)}
    out["backends"] = {
        name: {
            k: b.get(k)
            for k in ("backend", "full_walk", "incremental_refresh", "lookup", "error")
            if k in b
        }
        for name, b in backends.items()
    }
    with guest:
        if guest_flows:
            out.update(guest_new_flows(guest, guest_flows))
        out.update(new_sock_lookups(guest, rounds))
        out.update(blocked_new_sock_lookups(guest, rounds))
        out.update(decisions_per_second(guest, rounds * 20))
        if domain.qmp is not None:
            pauses, bare = [], []
            with open_monitor(domain) as qmp:
                for _ in range(walk_rounds or rounds):
                    with paused(qmp) as rec:
                        guest.walk()
                    pauses.append(rec.seconds)
                    with paused(qmp) as rec:
                        pass
                    bare.append(rec.seconds)
                    time.sleep(0.005)  # let the guest run between pauses
            out["pause_with_walk"] = summary_ms(pauses)
            out["pause_bare_stop_cont"] = summary_ms(bare)
    out["thesis_pause_ms"] = {"mean": 19, "max": 52, "min": 15}
    return out


def new_sock_lookups(guest: GuestIntrospector, rounds: int) -> dict[str, Any]:
    """Lookups of socks the index has just forgotten (as if created after the last walk),
    spread over the guest's sockets; holders compared with the walk's."""
    result = guest.walk()
    held: dict[int, set[tuple[int, int]]] = {}
    for s in result.sockets:
        held.setdefault(s.sock.address, set()).add((s.pid, s.fd))
    socks = {s.sock.address: s.sock for s in result.sockets if s.sock.proto in (6, 17)}
    addrs = sorted(socks)
    listening = {(k.family, k.lport) for k in socks.values() if k.proto == 6 and k.state == 10}
    boot = guest.boot()
    samples, wrong, unknown = [], 0, 0
    by_kind: dict[str, list[float]] = {}
    step = max(1, len(addrs) // max(1, rounds))
    for i in range(rounds):
        k = socks[addrs[(i * step) % len(addrs)]]
        boot.owners.pop(k.address, None)
        flow = Flow(k.proto, k.local, k.lport, k.remote, k.rport)
        t = time.perf_counter()
        own = guest.lookup(flow)
        samples.append(time.perf_counter() - t)
        by_kind.setdefault(new_sock_kind(k, listening), []).append(samples[-1])
        if own is None or not own.holders_known:
            unknown += 1
        elif own.sock_addr == k.address and {(o.pid, o.fd) for o in own.owners} != held.get(
            k.address, set()
        ):
            wrong += 1
    return {
        "new_sock_lookup": summary_ms(samples),
        "new_sock_unknown": unknown,
        "new_sock_disagreements": wrong,
        "new_sock_by_kind": {kind: summary_ms(v) for kind, v in sorted(by_kind.items())},
        "crosscheck": dataclasses.asdict(guest.crosscheck),
    }


def new_sock_kind(sock: InetSock, listening: set[tuple[int, int]]) -> str:
    """What first packet a new sock stands for: `tcp_out` an outgoing connection of an existing
    process (the connect()ing end), `tcp_in` an incoming connection's accepted end (its local
    port is a listener's), `tcp_listen` a new listener (the SYN of an incoming connection to a
    server started since the last walk), `udp` a datagram from a new UDP socket."""
    if sock.proto == IPProto.UDP:
        return "udp"
    if sock.state == 10:
        return "tcp_listen"
    return "tcp_in" if (sock.family, sock.lport) in listening else "tcp_out"


def blocked_new_sock_lookups(
    guest: GuestIntrospector, rounds: int, uid: int = 1001
) -> dict[str, Any]:
    """new_sock_lookups for the socks uid `uid`'s tasks hold, with that uid watched as
    `--block-uid` makes the gate do: the resolver searches its tasks first and stops at the
    first holder (a drop needs one). `blocked_found`: answers naming a holder of that uid."""
    result = guest.walk()
    tgids = {t.tgid for t in result.tasks if uid in (t.uid, t.euid)}
    socks = [s.sock for s in result.sockets if s.pid in tgids and s.sock.proto in (6, 17)]
    guest.watch = lambda o: uid in (o.uid, o.euid)
    boot = guest.boot()
    samples, found = [], 0
    for i in range(rounds if socks else 0):
        k = socks[i % len(socks)]
        boot.owners.pop(k.address, None)
        flow = Flow(k.proto, k.local, k.lport, k.remote, k.rport)
        t = time.perf_counter()
        own = guest.lookup(flow)
        samples.append(time.perf_counter() - t)
        found += own is not None and any(uid in (o.uid, o.euid) for o in own.owners)
    guest.watch = None
    return {
        "blocked_new_sock_lookup": summary_ms(samples) if samples else {"n": 0},
        "blocked_new_sock_socks": len(socks),
        "blocked_found": found,
    }


def _packet_from(sock: InetSock) -> bytes:
    """An IPv4 packet the guest's socket sends (TCP ACK or a UDP datagram), raw bytes."""
    proto = sock.proto
    src, dst = sock.local.packed, sock.remote.packed
    length = 20 + (20 if proto == IPProto.TCP else 8)
    ip = bytes([0x45, 0, 0, length, 0, 1, 0x40, 0, 64, proto, 0, 0]) + src + dst
    ports = sock.lport.to_bytes(2, "big") + sock.rport.to_bytes(2, "big")
    if proto == IPProto.TCP:
        return ip + ports + bytes(8) + b"\x50\x10" + bytes(6)
    return ip + ports + (8).to_bytes(2, "big") + bytes(2)


def decisions_per_second(guest: GuestIntrospector, count: int) -> dict[str, Any]:
    """First-packet decisions of distinct flows (IPv4 TCP/UDP sockets of the last walk, each
    flow once: every one a cache miss), owners from guest memory; one thread, one core."""
    result = guest.walk()
    socks = [
        s.sock
        for s in result.sockets
        if s.sock.family == 4 and s.sock.proto in (IPProto.TCP, IPProto.UDP) and s.sock.rport
    ]
    packets = list(dict.fromkeys(_packet_from(k) for k in socks))[:count]
    if not packets:
        return {}
    engine = Engine(guest.domain.id, {7: "vif"}, guest, compile_policy(uids=[1001]), OwnerCache())
    owned = 0
    t0 = time.perf_counter()
    for payload in packets:
        ev = engine.evaluate(payload, 7, 3)
        owned += ev.ownership is not None and bool(ev.ownership.owners)
    seconds = time.perf_counter() - t0
    return {
        "decisions": len(packets),
        "decisions_with_owners": owned,
        "decisions_per_s": round(len(packets) / seconds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument(
        "--walk-rounds", type=int, help="full walks (and paused walks) to time (default rounds)"
    )
    parser.add_argument("--profile", help="profile/ISF file (default: the domain's kernel)")
    parser.add_argument(
        "--guest-flows",
        type=int,
        default=0,
        help="real new flows per kind from a process in the lab guest ($XFGATE_LAB_PREFIX)",
    )
    args = parser.parse_args(argv)
    rounds = max(1, min(args.rounds, 100000))
    flows = max(0, min(args.guest_flows, 300))
    print(json.dumps(run(args.domain, rounds, args.profile, args.walk_rounds, flows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
