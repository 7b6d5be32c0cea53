"""`xfgate ps`: a domain's processes, users and sockets, read from guest memory (and the hook
for the Profile engineer's `xfgate profile ...` subcommands)."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from xfgate.config import DEFAULT_CACHE_DIR, DomainConfig
from xfgate.errors import ProfileError
from xfgate.vmi.profile import Profile

log = logging.getLogger(__name__)


def register(sub: Any, with_profile: bool = True) -> None:
    """Add this subsystem's subcommands to the top-level parser's subparsers (`ps` alone
    without `with_profile`: `xfgate ps` does not import the profile builder)."""
    ps = sub.add_parser(
        "ps",
        help="list a domain's processes, users and sockets by introspecting its memory",
        description="List a guest's processes (pid, ppid, uid, comm) and their TCP/UDP sockets "
        "from the host, by reading the guest kernel's memory. The guest is never logged into.",
    )
    ps.add_argument(
        "--domain", required=True, help="domain id, name or UUID (see `xfgate domains`)"
    )
    ps.add_argument("--json", action="store_true", help="the `xfgate-lab truth --json` shape")
    ps.add_argument("--pid", type=int, help="only this process")
    ps.add_argument("--uid", type=int, help="only processes of this (real) uid")
    ps.add_argument(
        "--profile",
        help="kernel profile or Volatility ISF file (default: built "
        "from the domain's kernel and cached)",
    )
    ps.add_argument(
        "--no-pause",
        action="store_true",
        help="never pause the guest, even when live reads keep tearing",
    )
    ps.add_argument(
        "--walk",
        action="store_true",
        help="walk the guest's memory from this process even when a gate serves the domain "
        "(default: ask the gate, which answers from its view made current for the request)",
    )
    ps.set_defaults(handler=run_ps)
    if not with_profile:
        return
    try:  # the `profile` subcommands live with the profile builder
        profile_cli = importlib.import_module("xfgate.vmi.profile_cli")
    except ModuleNotFoundError:
        return
    profile_cli.register(sub)


def load_domain_profile(
    domain: DomainConfig, path: str | None, cache_dir: Path = DEFAULT_CACHE_DIR
) -> Profile:
    """The profile in `path`, else the one built (and cached in `cache_dir`) for the domain."""
    try:
        build = importlib.import_module("xfgate.vmi.profile_build")
    except ModuleNotFoundError as e:
        raise ProfileError(f"profile building is not available ({e})") from e
    profile: Profile = (
        build.load_profile(path) if path else build.profile_for_domain(domain, cache_dir)
    )
    # A profile is ~1M objects (every BTF struct and kallsyms name) that live as long as the
    # process: out of the cyclic collector's sight (gc.freeze), which otherwise traverses them
    # all on every full collection - a third of a crowded guest's walk (0.8 -> 0.5 s CPU) and
    # a pause of tens of ms whenever it strikes on the packet path. Nothing else is frozen
    # for good: objects alive now are the process's own start-up (modules, config).
    gc.freeze()
    return profile


def filter_document(doc: dict[str, Any], pid: int | None, uid: int | None) -> dict[str, Any]:
    procs = [
        p
        for p in doc["processes"]
        if (pid is None or p["pid"] == pid) and (uid is None or p["uid"] == uid)
    ]
    keep = {p["pid"] for p in procs}
    return {"processes": procs, "sockets": [s for s in doc["sockets"] if s["pid"] in keep]}


def json_lines(doc: dict[str, Any]) -> str:
    """`doc` as JSON, each entry of its lists on a line of its own: as readable as indent=1
    for a listing, and written by json's C encoder (indent=N takes the pure-Python one: 1 s
    of a crowded guest's 3.7 MB document)."""
    parts = []
    for key, value in doc.items():
        head = f" {json.dumps(key)}: "
        if isinstance(value, list) and value:
            items = ",\n  ".join(json.dumps(item) for item in value)
            parts.append(f"{head}[\n  {items}\n ]")
        else:
            parts.append(head + json.dumps(value))
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


def _endpoint(addr: str, port: int, family: int) -> str:
    return f"[{addr}]:{port}" if family == 6 else f"{addr}:{port}"


TABLE_HEADER = ("PID", "PPID", "UID", "COMM", "PROTO", "LOCAL", "REMOTE", "STATE")


def table_rows(p: dict[str, Any], mine: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """One process's rows: one per socket, or one of its own without sockets."""
    base = (str(p["pid"]), str(p["ppid"]), str(p["uid"]), p["comm"])
    if not mine:
        return [(*base, "", "", "", "")]
    return [
        (
            *base,
            f"{s['proto']}{'6' if s['family'] == 6 else ''}",
            _endpoint(s["local"], s["lport"], s["family"]),
            _endpoint(s["remote"], s["rport"], s["family"]),
            s["state"],
        )
        for s in mine
    ]


def table_widths(rows: list[tuple[str, ...]]) -> tuple[int, ...]:
    return tuple(max((len(r[i]) for r in rows), default=0) for i in range(len(TABLE_HEADER)))


def table_lines(rows: list[tuple[str, ...]], widths: tuple[int, ...]) -> str:
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_table(doc: dict[str, Any]) -> str:
    """One line per (process, socket), a process without sockets on a line of its own."""
    rows: list[tuple[str, ...]] = []
    socks: dict[int, list[dict[str, Any]]] = {}
    for s in doc["sockets"]:
        socks.setdefault(s["pid"], []).append(s)
    for p in doc["processes"]:
        rows += table_rows(p, socks.get(p["pid"], []))
    widths = table_widths([TABLE_HEADER, *rows])
    return table_lines([TABLE_HEADER, *rows], widths)


# `ps` is an operator's read, not the packet path: its walk may take longer than the gate's
# (a 2,000-task guest holding 20,000 sockets walks in 2-4 s on a loaded 2-core host).
PS_WALK_SECONDS = 30.0


# How long `ps` waits for a gate's answer (its walk is bounded by xfgate.vmi.current's 5 s).
PS_GATE_TIMEOUT = 30.0


def ps_from_gate(args: argparse.Namespace) -> int | None:
    """`ps` answered by the gate serving the domain (`xfgate run` or `xfgate serve`), its
    exit code; None when no gate serves it or it cannot answer (then the caller walks).
    Imports only the control protocol: not the walk, not the profile."""
    from xfgate.config import load_domains  # (its module is imported already)
    from xfgate.verdict import control

    spec = str(args.domain).strip()
    cfg = load_domains(args.domains_file).get(int(spec)) if spec.isdigit() else None
    if cfg is None:  # a name or UUID, a libvirt domain: resolved as the walk resolves it
        from xfgate.hypervisor.resolve import resolve_domain

        cfg = resolve_domain(spec, args.domains_file, args.libvirt_uri)
    path = control.socket_path(args.run_dir, cfg.id)
    if not path.exists():
        log.debug("no gate serves domain %d (%s): walking the guest", cfg.id, path)
        return None
    request: dict[str, Any] = {
        "op": "ps",
        "format": "json" if args.json else "table",
        # The gate refuses unless it serves this very guest (another domains file, another
        # lab behind the same run directory: its answer would be another guest's).
        "domain": {"id": cfg.id, "name": cfg.name, "memory": cfg.memory.path},
    }
    if args.pid is not None:
        request["pid"] = args.pid
    if args.uid is not None:
        request["uid"] = args.uid
    try:
        reply, body = control.request_body(args.run_dir, cfg.id, request, PS_GATE_TIMEOUT)
    except control.ControlError as e:
        log.warning("%s: walking the guest instead", e)
        return None
    sys.stdout.write(body.decode())
    sys.stdout.flush()
    gate = reply.get("gate", {})
    log.info(
        "from the gate (pid %s): read %.0f ms ago, made current from a view %.1f s old%s",
        gate.get("pid"),
        1000 * float(gate.get("age_seconds", 0.0)),
        float(gate.get("base_age_seconds", -1.0)),
        "" if gate.get("complete") else " (INCOMPLETE)",
    )
    for problem in gate.get("problems", [])[:10]:
        log.warning("%s", problem)
    return 0 if gate.get("complete") else 1


def run_ps(args: argparse.Namespace) -> int:
    if not args.walk and args.profile is None:
        answered = ps_from_gate(args)
        if answered is not None:
            return answered
    from xfgate.hypervisor.resolve import resolve_domain
    from xfgate.vmi.introspect import GuestIntrospector
    from xfgate.vmi.linux import WalkBounds
    from xfgate.vmi.liveness import require_running

    domain = resolve_domain(args.domain, args.domains_file, args.libvirt_uri)
    require_running(domain)
    profile = load_domain_profile(domain, args.profile, args.cache_dir)
    bounds = WalkBounds(seconds=PS_WALK_SECONDS)
    with GuestIntrospector(domain, profile, allow_pause=not args.no_pause, bounds=bounds) as guest:
        result = guest.walk()
        doc = filter_document(guest.ps_json(result), args.pid, args.uid)
    if args.json:
        print(json_lines({**doc, "source": "walk"}))
    else:
        print(format_table(doc))
    for err in result.errors[:10]:
        log.warning("%s", err)
    if result.paused_seconds:
        log.info("paused the guest %.1f ms for a consistent read", result.paused_seconds * 1000)
    return 1 if result.errors else 0
