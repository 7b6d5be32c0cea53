"""`xfgate domains`: every domain xfgate can see, and how (domains file, bare QEMU, libvirt)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from xfgate.hypervisor.resolve import VisibleDomain, visible_domains

log = logging.getLogger("xfgate")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "domains",
        help="list the domains xfgate can see and how (domains file, QEMU, libvirt)",
        description="Domains of the domains file and, unless --libvirt-uri none, of libvirt; "
        "any of their id, name or UUID is what every command's --domain takes.",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_domains)


def cmd_domains(args: argparse.Namespace) -> int:
    domains, notes = visible_domains(args.domains_file, args.libvirt_uri)
    for note in notes:
        log.warning("%s", note)
    if args.json:
        print(json.dumps([d.to_json() for d in domains], indent=2))
    else:
        print(format_domains(domains))
    return 0


def format_domains(domains: list[VisibleDomain]) -> str:
    if not domains:
        return "no domains visible (domains file empty, libvirt has none or was not looked at)"
    header = ("ID", "NAME", "SOURCE", "STATE", "PID", "VIFS", "MEMORY", "NETNS", "UUID")
    rows = [
        (
            str(d.id) if d.id >= 0 else "-",
            d.name,
            d.source,
            d.state,
            str(d.pid or "-"),
            ",".join(d.vifs) or "-",
            d.memory_backend,
            d.netns or "-",
            d.uuid or "-",
        )
        for d in domains
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )
