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
- guest_passed_flows (`--guest-flows N`, a lab guest): first-packet lookups of N UDP sockets a
  long-lived process received by SCM_RIGHTS after the last walk (`xfprobe passflows`), the
  receiver their only holder, named neither by the file's f_cred nor by sk_uid;
- decisions_per_s / decisions_per_cpu_s: Engine.evaluate() over the gate's LockedOwnerSource of
  the first packet of distinct flows (every one a cache miss): half sent by the guest's
  connected TCP/UDP sockets (IPv4 and IPv6), half sent to its listeners and bound UDP sockets
  from distinct remote ports; owners from guest memory (hash tables and the walk's index), one
  thread; wall-clock and process-CPU rates (the CPU one is what one core does on a loaded host).
  Before 2026-11-30 it timed only the outgoing IPv4 flows: one packet on the 51-task guest;
- ps_end_to_end: `xfgate ps --domain N --json` in a new process, as an operator runs it;
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
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from ipaddress import ip_address
from typing import Any

from xfgate.config import DomainConfig, MemoryConfig, get_domain
from xfgate.errors import XfgateError
from xfgate.flow import Flow, IPAddress
from xfgate.inet import IPProto
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine, LockedOwnerSource
from xfgate.verdict.policy import compile_policy
from xfgate.vmi import jhash
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


def _launch_probe(
    guest: GuestIntrospector, layout: LabLayout, args: str, log: str, started: str
) -> tuple[int, int] | str:
    """Walks, then starts `xfprobe ARGS DELAY_MS 600` in the guest (output in `log`) with a
    delay that lets the next walk end before the probe acts: (its pid, read from the line
    `started` matches, and the delay), or what went wrong."""
    t = time.perf_counter()
    guest.walk()
    delay_ms = int((time.perf_counter() - t) * 3000) + 3000  # the next walk ends before it
    start = f"setsid xfprobe {args} {delay_ms} 600 > {log} 2>&1 < /dev/null & sleep 1; cat {log}"
    out = guest_exec(layout, guest.domain.id, start, timeout=20).output.decode(errors="replace")
    m = re.search(started, out)
    return (int(m.group(1)), delay_ms) if m else out.strip()[-200:]


def _await_probe(
    guest: GuestIntrospector, layout: LabLayout, pid: int, delay_ms: int, log: str
) -> str:
    """A complete walk sees `pid`, then the probe says `ready` in `log`: "" or what failed."""
    result = guest.walk()
    if not any(t.pid == pid for t in result.tasks) or not result.complete:
        return f"the walk did not see the probe's pid {pid} (delay too short)"
    for _ in range(int(delay_ms / 1000) + 60):
        time.sleep(1.0)
        if b"ready" in guest_exec(layout, guest.domain.id, f"cat {log}", timeout=10).output:
            return ""
    return "the probe did not get ready"


def guest_new_flows(
    guest: GuestIntrospector, n: int, layout: LabLayout | None = None
) -> dict[str, Any]:
    """First-packet lookups of flows a process the last walk saw opens after it (see the module
    doc): per kind p50/p99, how many answered with that process as a holder, all known. The
    guest is `layout`'s (default: $XFGATE_LAB_PREFIX's lab)."""
    layout = layout or layout_from_env()
    log = "/tmp/xfnewflows.log"
    launched = _launch_probe(
        guest, layout, f"newflows {NEW_FLOWS_PORT} {n}", log, r"pid (\d+) waiting"
    )
    if isinstance(launched, str):
        return {"guest_new_flows_error": launched}
    pid, delay_ms = launched
    try:
        if problem := _await_probe(guest, layout, pid, delay_ms, log):
            return {"guest_new_flows_error": problem}
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
        guest_exec(layout, guest.domain.id, f"kill {pid}", timeout=10)
    return {
        "guest_new_flows": {k: summary_ms(v) for k, v in samples.items()},
        "guest_new_flows_attributed": right,
        "guest_new_flows_by_count": by_count,
        "guest_new_flows_tables_read": tables,
    }


PASS_FLOWS_PORT = 27000  # xfprobe passflows: 127.0.0.1:PORT+1+i -> :PORT


def guest_passed_flows(
    guest: GuestIntrospector, n: int, layout: LabLayout | None = None
) -> dict[str, Any]:
    """First-packet lookups of UDP sockets a long-lived process RECEIVES by SCM_RIGHTS after
    the last walk and connects (`xfprobe passflows`: a root sender opens and passes them, the
    receiver, uid 1000, is their only holder: neither f_cred nor sk_uid names it, as for
    systemd socket activation or a privilege-separated daemon): per lookup p50/p99, how many
    answered with the receiver as the holder, all known; the resolver's tables read."""
    layout = layout or layout_from_env()
    log = "/tmp/xfpassflows.log"
    launched = _launch_probe(
        guest, layout, f"passflows {PASS_FLOWS_PORT} {n}", log, r"receiver (\d+) waiting"
    )
    if isinstance(launched, str):
        return {"guest_passed_flows_error": launched}
    pid, delay_ms = launched
    try:
        if problem := _await_probe(guest, layout, pid, delay_ms, log):
            return {"guest_passed_flows_error": problem}
        lo, p = ip_address("127.0.0.1"), PASS_FLOWS_PORT
        samples: list[float] = []
        right = 0
        cc = guest.crosscheck
        tables, located = getattr(cc, "tables_read", 0), getattr(cc, "located", 0)
        for i in range(n):
            flow = Flow(IPProto.UDP, lo, p + 1 + i, lo, p)
            t = time.perf_counter()
            own = guest.lookup(flow)
            samples.append(time.perf_counter() - t)
            right += own is not None and own.holders_known and {o.pid for o in own.owners} == {pid}
    finally:
        guest_exec(layout, guest.domain.id, f"kill {pid}", timeout=10)
    return {
        "guest_passed_flows": summary_ms(samples),
        "guest_passed_flows_attributed": right,
        "guest_passed_flows_tables_read": getattr(cc, "tables_read", 0) - tables,
        "guest_passed_flows_located": getattr(cc, "located", 0) - located,
    }


def run(
    domain_id: int,
    rounds: int,
    profile_path: str | None,
    walk_rounds: int | None = None,
    ps_runs: int = 5,
    guest_flows: int = 0,
    ps_bytecode: bool = False,
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
            out.update(guest_passed_flows(guest, guest_flows))
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
    if ps_runs:  # 0: the caller times `xfgate ps` itself (bench.scale)
        out.update(ps_end_to_end(domain_id, ps_runs, ps_bytecode))
    return out


def udp_chain_lengths(guest: GuestIntrospector) -> dict[str, Any]:
    """How long the UDP chains a lookup follows are, per bound UDP sock of the last walk, in
    the port-hashed table (udp_table.hash: what SocketTables._udp walks) and in the
    address+port one (hash2, on skc_portaddr_node: what __udp4_lib_lookup walks, first the
    sock's own address, then the wildcard's when nothing matched there)."""
    result = guest.walk()
    tables = guest.boot().tables
    if tables is None:
        return {}
    mix, mask = tables.secrets().hash_mix, tables.tables().udp_mask
    socks = {s.sock.address: s.sock for s in result.sockets if s.sock.proto == IPProto.UDP}

    def slot2(sock: InetSock, addr: bytes) -> int:
        portaddr = jhash.ipv4_portaddr_hash if sock.family == 4 else jhash.ipv6_portaddr_hash
        return portaddr(addr, sock.lport, mix) & mask

    by_port = Counter((k.lport + mix) & mask for k in socks.values())
    by_addr = Counter(slot2(k, k.local.packed) for k in socks.values())
    hash1 = [by_port[(k.lport + mix) & mask] for k in socks.values()]
    own = [by_addr[slot2(k, k.local.packed)] for k in socks.values()]
    both = [
        n + (0 if k.local.is_unspecified else by_addr[slot2(k, bytes(4 if k.family == 4 else 16))])
        for n, k in zip(own, socks.values(), strict=True)
    ]
    return {
        "udp_socks": len(socks),
        "udp_slots": mask + 1,
        "hash1_chain_mean": round(statistics.fmean(hash1), 1) if hash1 else 0,
        "hash2_own_address_chain_mean": round(statistics.fmean(own), 1) if own else 0,
        "hash2_own_plus_wildcard_mean": round(statistics.fmean(both), 1) if both else 0,
    }


def quick(
    domain_id: int, what: str, rounds: int, ps_runs: int, ps_bytecode: bool
) -> dict[str, Any]:
    """One figure only, for an A/B of two trees in one session: "decisions" (three runs of
    decisions_per_second over rounds*20 distinct flows each) or "ps" (ps_end_to_end)."""
    out: dict[str, Any] = {"domain": domain_id, "loadavg": os.getloadavg()}
    if what == "ps":
        out.update(ps_end_to_end(domain_id, ps_runs, ps_bytecode))
        return out
    domain = get_domain(domain_id, domains_file_from_env())
    profile = load_domain_profile(domain, None, cache_dir_from_env())
    guest = GuestIntrospector(domain, profile, allow_pause=False, bounds=WalkBounds(seconds=30.0))
    with guest:
        if what == "udp-chains":
            out.update(udp_chain_lengths(guest))
            return out
        if what == "flood":
            floods = [flood_decisions_per_second(guest, rounds * 20) for _ in range(3)]
            out["flood_runs"] = floods
            out["flood_syns_per_cpu_s"] = statistics.median(
                r.get("flood_syns_per_cpu_s") or 0 for r in floods
            )
            return out
        runs = [decisions_per_second(guest, rounds * 20) for _ in range(3)]
    out["decisions_runs"] = runs
    for key in ("decisions_per_s", "decisions_per_cpu_s"):
        out[key] = statistics.median(r.get(key) or 0 for r in runs)
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


def _packet(proto: int, src: IPAddress, sport: int, dst: IPAddress, dport: int) -> bytes:
    """An IPv4 or IPv6 packet (TCP ACK or a UDP datagram, no payload), raw bytes."""
    l4 = sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    if proto == IPProto.TCP:
        l4 += bytes(8) + b"\x50\x10" + bytes(6)
    else:
        l4 += (8).to_bytes(2, "big") + bytes(2)
    if src.version == 4:
        length = (20 + len(l4)).to_bytes(2, "big")
        return (
            bytes([0x45, 0])
            + length
            + bytes([0, 1, 0x40, 0, 64, proto, 0, 0])
            + src.packed
            + dst.packed
            + l4
        )
    return (
        b"\x60"
        + bytes(3)
        + len(l4).to_bytes(2, "big")
        + bytes([proto, 64])
        + src.packed
        + dst.packed
        + l4
    )


def _packet_from(sock: InetSock) -> bytes:
    """A packet the guest's (connected) socket sends, raw bytes."""
    return _packet(sock.proto, sock.local, sock.lport, sock.remote, sock.rport)


def first_packets(
    sockets: Sequence[InetSock], count: int
) -> dict[str, list[tuple[bytes, int, int]]]:
    """Up to `count` first packets of distinct flows, each (payload, physindev, physoutdev),
    by kind: "out" - sent by the guest's connected TCP/UDP sockets (IPv4 and IPv6); "in" -
    sent to its listeners (a TCP ACK: a SYN is cached per listener, not per flow) and bound
    UDP sockets from distinct remote ports. Half of each when the guest has both."""
    ported = [k for k in sockets if k.proto in (IPProto.TCP, IPProto.UDP)]
    out = list(dict.fromkeys(_packet_from(k) for k in ported if k.rport))
    servers = [k for k in ported if not k.rport and k.lport]
    incoming: list[bytes] = []
    peers = {4: ip_address("198.19.0.1"), 6: ip_address("2001:2::9:1")}
    for i in range(count if servers else 0):
        k = servers[i % len(servers)]
        peer = peers[k.family]
        local = (
            k.local
            if not k.local.is_unspecified
            else ip_address("198.18.1.1" if k.family == 4 else "2001:2::1:1")
        )
        sport = 1024 + (i // len(servers)) % 64000
        incoming.append(_packet(k.proto, peer, sport, local, k.lport))
    n_in = min(len(incoming), max(count // 2, count - len(out)))
    n_out = min(len(out), count - n_in)
    return {
        "out": [(p, VIF, OTHER) for p in out[:n_out]],
        "in": [(p, OTHER, VIF) for p in incoming[:n_in]],
    }


VIF, OTHER = 7, 3  # ifindexes: the domain's vif and the bridge's other port


def decisions_per_second(guest: GuestIntrospector, count: int) -> dict[str, Any]:
    """First-packet decisions of distinct flows (first_packets: every one a cache miss),
    through the gate's own path (Engine.evaluate over a LockedOwnerSource), owners from guest
    memory (hash tables, the walk's index); one thread. One decision first, untimed (the hash
    secrets and table pointers are read once per boot). Wall-clock and process CPU rates: on a
    loaded host the CPU rate is the one that says what one core does."""
    result = guest.walk()
    kinds = first_packets([s.sock for s in result.sockets], count)
    packets = kinds["out"] + kinds["in"]
    if not packets:
        return {}
    engine = Engine(
        guest.domain.id,
        {VIF: "vif"},
        LockedOwnerSource(guest),
        compile_policy(uids=[1001]),
        OwnerCache(),
    )
    engine.evaluate(
        _packet(IPProto.UDP, ip_address("198.19.0.9"), 9, ip_address("198.18.1.1"), 9), OTHER, VIF
    )
    engine.cache.clear()
    owned = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for payload, physin, physout in packets:
        ev = engine.evaluate(payload, physin, physout)
        owned += ev.ownership is not None and bool(ev.ownership.owners)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "decisions": len(packets),
        "decisions_out_in": [len(kinds["out"]), len(kinds["in"])],
        "decisions_with_owners": owned,
        "decisions_per_s": round(len(packets) / seconds),
        "decisions_per_cpu_s": round(len(packets) / cpu) if cpu > 0 else None,
    }


def flood_decisions_per_second(guest: GuestIntrospector, count: int) -> dict[str, Any]:
    """The gate's CPU per flood SYN (issue 9's flood: a blocked user's new connections):
    Engine.evaluate over LockedOwnerSource of one outgoing TCP SYN per connected TCP sock of
    the guest (up to `count`, distinct flows), each sock forgotten by the owner index first
    (a sock created since the last walk, as every flood connection is), the creator's uid
    blocked and `creator_decides` set as `xfgate run` sets it: each SYN is dropped after its
    ehash lookup, with no holder search. `flood_drops`: SYNs dropped (all, if the path holds)."""
    result = guest.walk()
    socks = [
        s.sock
        for s in result.sockets
        if s.sock.proto == IPProto.TCP and s.sock.rport and s.sock.state == 1  # ESTABLISHED
    ]
    socks = list({k.address: k for k in socks}.values())[:count]
    if not socks:
        return {}
    uids = sorted({k.sk_uid for k in socks})
    policy = compile_policy(uids=uids)
    engine = Engine(guest.domain.id, {VIF: "vif"}, LockedOwnerSource(guest), policy, OwnerCache())
    guest.creator_decides = lambda uid: engine.policy.blocks_creator(uid)
    packets = []
    for k in socks:
        syn = bytearray(_packet(k.proto, k.local, k.lport, k.remote, k.rport))
        syn[-7] = 0x02  # the TCP header's flags octet (20 bytes, no payload): SYN only
        packets.append(bytes(syn))
    boot = guest.boot()
    for k in socks:
        boot.owners.pop(k.address, None)
    drops = 0
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for payload in packets:
            ev = engine.evaluate(payload, VIF, OTHER)
            drops += ev.decision.verdict.value == "drop"
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        guest.creator_decides = None
    return {
        "flood_syns": len(packets),
        "flood_drops": drops,
        "flood_syns_per_s": round(len(packets) / seconds),
        "flood_syns_per_cpu_s": round(len(packets) / cpu) if cpu > 0 else None,
    }


def _children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ps_end_to_end(domain_id: int, runs: int, bytecode: bool = False) -> dict[str, Any]:
    """`xfgate ps --domain N --json` as an operator runs it: a new process each time (Python
    start, imports, profile load, kernel location, full walk, JSON out), one untimed run first
    (page cache, and the profile's side cache). `bytecode_cached` False: this Python writes no
    .pyc (PYTHONDONTWRITEBYTECODE), every import compiles its module; `bytecode` True runs the
    children as an installed package runs (.pyc kept, in a private PYTHONPYCACHEPREFIX written
    by the untimed run and removed after)."""
    if bytecode:
        with tempfile.TemporaryDirectory(prefix="xfgate-bench-pyc-") as prefix:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = prefix
            return _ps_runs(domain_id, runs, env, True)
    return _ps_runs(domain_id, runs, None, not sys.flags.dont_write_bytecode)


def _ps_runs(
    domain_id: int, runs: int, env: dict[str, str] | None, bytecode_cached: bool
) -> dict[str, Any]:
    argv = [sys.executable, "-m", "xfgate.cli"]
    argv += [
        "--domains-file",
        str(domains_file_from_env()),
        "--cache-dir",
        str(cache_dir_from_env()),
    ]
    argv += ["ps", "--domain", str(domain_id), "--json", "--walk"]  # the walk, not a gate
    samples: list[float] = []
    cpu: list[float] = []
    doc: dict[str, Any] = {}
    for i in range(runs + 1):
        t, c = time.perf_counter(), _children_cpu()
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False, env=env)
        if i:
            samples.append(time.perf_counter() - t)
            cpu.append(_children_cpu() - c)
        if done.returncode not in (0, 1):
            return {"ps_error": done.stderr.decode(errors="replace")[-500:]}
        doc = json.loads(done.stdout)
    return {
        "ps_end_to_end": summary_ms(samples),
        "ps_end_to_end_cpu": summary_ms(cpu),
        "ps_processes_sockets": [len(doc.get("processes", ())), len(doc.get("sockets", ()))],
        "ps_bytecode_cached": bytecode_cached,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument(
        "--walk-rounds", type=int, help="full walks (and paused walks) to time (default rounds)"
    )
    parser.add_argument("--profile", help="profile/ISF file (default: the domain's kernel)")
    parser.add_argument("--ps-runs", type=int, default=5, help="`xfgate ps` runs to time")
    parser.add_argument(
        "--guest-flows",
        type=int,
        default=0,
        help="real new flows per kind from a process in the lab guest ($XFGATE_LAB_PREFIX)",
    )
    parser.add_argument(
        "--ps-bytecode",
        action="store_true",
        help="`xfgate ps` children keep their .pyc (as an installed package), in a private dir",
    )
    parser.add_argument(
        "--only",
        choices=["decisions", "ps", "udp-chains", "flood"],
        help="only new-flow decisions/s, only `xfgate ps` (a quick A/B), only the UDP "
        "chain lengths of the port and the address+port tables, or only the flood SYN "
        "decisions/s (a blocked creator's new socks, flood_decisions_per_second)",
    )
    args = parser.parse_args(argv)
    rounds, ps_runs = max(1, min(args.rounds, 100000)), max(0, min(args.ps_runs, 100))
    flows = max(0, min(args.guest_flows, 300))
    if args.only:
        print(
            json.dumps(quick(args.domain, args.only, rounds, ps_runs, args.ps_bytecode), indent=1)
        )
        return 0
    print(
        json.dumps(
            run(
                args.domain,
                rounds,
                args.profile,
                args.walk_rounds,
                ps_runs,
                flows,
                args.ps_bytecode,
            ),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
