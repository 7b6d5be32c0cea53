"""Introspection timings on a live lab guest, printed as JSON.

    python -m bench.vmi_bench --domain 1 [--rounds 200] [--profile FILE]

- full_walk: GuestIntrospector.walk() (every task, fd table and inet socket), unpaused;
- backends: full_walk and lookup of the same guest through each memory backend it offers in
  the same run (a shared-file guest: the RAM file, and the QEMU process's memory);
- lookup: GuestIntrospector.lookup() of every socket's flow with a warm owner index (the
  verdict engine's cache-miss path);
- pause: the guest stopped over QMP around one full walk (stop, walk, cont), as the thesis's
  xFilter paused per poll (19 ms average, 52 ms max there), and the bare stop+cont round trip.
Bounded: `rounds` iterations of each, nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from xfgate.config import DomainConfig, MemoryConfig, get_domain
from xfgate.errors import XfgateError
from xfgate.flow import Flow
from xfgate.vmi.cli import load_domain_profile
from xfgate.vmi.introspect import GuestIntrospector
from xfgate.vmi.memory import PhysicalMemory
from xfgate.vmi.monitor import open_monitor
from xfgate.vmi.profile import Profile
from xfgate.vmi.qmp import paused
from xfgate_lab.layout import cache_dir_from_env, domains_file_from_env


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
    domain: DomainConfig, profile: Profile, rounds: int, memory: PhysicalMemory | None = None
) -> tuple[dict[str, Any], GuestIntrospector]:
    """Full walk and targeted lookup timings of one backend (the domain's own, or `memory`)."""
    out: dict[str, Any] = {}
    guest = GuestIntrospector(domain, profile, allow_pause=False, memory=memory)
    out["backend"] = guest.memory.name
    t0 = time.perf_counter()
    first = guest.walk()
    out["first_walk_incl_kaslr_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    out["kaslr_method"] = guest.boot().location.method
    out["tasks"], out["sockets"] = len(first.tasks), len(first.sockets)
    walks, incomplete = [], 0
    for _ in range(rounds):
        t = time.perf_counter()
        result = guest.walk()
        walks.append(time.perf_counter() - t)
        incomplete += not result.complete
    out["full_walk"] = summary_ms(walks)
    out["full_walk_incomplete"] = incomplete
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


def run(domain_id: int, rounds: int, profile_path: str | None) -> dict[str, Any]:
    domain = get_domain(domain_id, domains_file_from_env())
    profile = load_domain_profile(domain, profile_path, cache_dir_from_env())
    out: dict[str, Any] = {"domain": domain_id, "rounds": rounds, "loadavg": os.getloadavg()}
    main, guest = walk_and_lookup(domain, profile, rounds)
    out.update(main)
    # The same guest through the other backend in the same run: a shared-file guest's QEMU is
    # also a process whose RAM can be read with process_vm_readv.
    backends = {domain.memory.backend: main}
    if domain.memory.backend == "qemu-shm" and domain.qmp is not None:
        other = replace(domain, memory=MemoryConfig("qemu-process", ""))
        try:
            backends["qemu-process"], g2 = walk_and_lookup(other, profile, rounds)
            g2.close()
        except XfgateError as e:
            backends["qemu-process"] = {"error": str(e)}
    out["backends"] = {
        name: {k: b.get(k) for k in ("backend", "full_walk", "lookup", "error") if k in b}
        for name, b in backends.items()
    }
    with guest:
        if domain.qmp is not None:
            pauses, bare = [], []
            with open_monitor(domain) as qmp:
                for _ in range(rounds):
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--profile", help="profile/ISF file (default: the domain's kernel)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.domain, max(1, min(args.rounds, 100000)), args.profile), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
