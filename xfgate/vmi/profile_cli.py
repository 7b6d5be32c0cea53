"""`xfgate profile build|show`: build, cache, export and inspect kernel profiles.

Wired into the top-level parser by one ``register(sub)`` call.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from xfgate.config import DomainConfig
from xfgate.errors import ConfigError
from xfgate.hypervisor.resolve import resolve_domain
from xfgate.vmi import isf, profile_build, profile_memory
from xfgate.vmi.liveness import require_running
from xfgate.vmi.profile import Profile


def register(sub: Any) -> None:
    """Add `profile build` and `profile show` to the top-level subparsers."""
    parser = sub.add_parser("profile", help="build, export and inspect guest kernel profiles")
    psub = parser.add_subparsers(dest="profile_command", required=True, metavar="ACTION")

    build = psub.add_parser(
        "build",
        help="build (or reuse) the profile of a kernel from its vmlinuz: BTF + kallsyms",
        description="Build a kernel profile from a Debian kernel package's vmlinuz (no -dbg "
        "package needed) and cache it under CACHE_DIR/profiles (--cache-dir).",
    )
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--kernel-package",
        metavar="NAME",
        help="Debian package, e.g. linux-image-amd64 or linux-image-6.1.0-56-cloud-amd64",
    )
    source.add_argument("--vmlinuz", metavar="PATH", help="a vmlinuz, vmlinux or unpacked package")
    source.add_argument(
        "--domain",
        metavar="SPEC",
        help="the kernel of domain SPEC (id, name, UUID): its package, else read from its memory",
    )
    build.add_argument(
        "--from-memory",
        action="store_true",
        help="with --domain: build from the running guest's memory (VMCOREINFO, kallsyms, BTF) "
        "even when the domains file names its kernel package",
    )
    build.add_argument("--isf", metavar="OUT", help="also write the Volatility 3 ISF (.json|.xz)")
    build.add_argument(
        "--signed-addresses",
        action="store_true",
        help="write ISF symbol addresses as signed 64-bit numbers (for LibVMI)",
    )
    build.add_argument("--system-map", metavar="OUT", help="also write the rebuilt System.map")
    build.add_argument("--rebuild", action="store_true", help="ignore a cached profile")
    build.set_defaults(handler=run_build)

    show = psub.add_parser("show", help="print a profile's summary, a struct or a symbol")
    where = show.add_mutually_exclusive_group(required=True)
    where.add_argument("--domain", metavar="SPEC", help="the profile of domain SPEC")
    where.add_argument(
        "path", nargs="?", help="profile .json, ISF (.json/.json.xz), vmlinuz or kernel package dir"
    )
    show.add_argument("--struct", metavar="NAME", help="print this struct's members")
    show.add_argument("--symbol", metavar="NAME", help="print this symbol's address")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=run_show)


def _build_source(args: argparse.Namespace) -> Path | DomainConfig:
    """A kernel image to build from, or the domain whose memory to build from."""
    if args.from_memory and args.domain is None:
        raise ConfigError("--from-memory reads a running guest: name it with --domain N")
    if args.kernel_package:
        return profile_build.kernel_assets_for(args.kernel_package, args.cache_dir)
    if args.vmlinuz:
        return Path(args.vmlinuz)
    domain = resolve_domain(args.domain, args.domains_file, args.libvirt_uri)
    if args.from_memory:
        return domain
    if domain.kernel.assets:
        return Path(domain.kernel.assets)
    if domain.kernel.package:
        return profile_build.kernel_assets_for(domain.kernel.package, args.cache_dir)
    return domain  # no kernel named: the guest's memory has everything


def run_build(args: argparse.Namespace) -> int:
    source = _build_source(args)
    if isinstance(source, DomainConfig):
        require_running(source)
        result = profile_memory.domain_memory_profile(source, args.cache_dir, args.rebuild)
        print(f"domain {source.id}: profile from guest memory")
    else:
        result = profile_build.build_profile_files(source, args.cache_dir, rebuild=args.rebuild)
    p = result.profile
    how = "cached" if result.from_cache else "built"
    print(f"{how} profile for {p.release}: {len(p.structs)} structs, {len(p.symbols)} symbols")
    print(f"  profile    {result.profile_path}")
    print(f"  ISF        {result.isf_path} ({result.isf_path.stat().st_size} bytes)")
    print(f"  System.map {result.system_map_path}")
    if result.timings:
        print("  seconds    " + ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items()))
    if args.isf:
        out = Path(args.isf)
        if out.suffix == ".xz" and not args.signed_addresses:
            shutil.copyfile(result.isf_path, out)
        else:
            doc = isf.read_isf(result.isf_path)
            isf.write_isf(isf.with_signed_addresses(doc) if args.signed_addresses else doc, out)
        print(f"wrote ISF {out}")
    if args.system_map:
        shutil.copyfile(result.system_map_path, args.system_map)
        print(f"wrote System.map {args.system_map}")
    return 0


def _show_profile(args: argparse.Namespace) -> Profile:
    if args.domain is not None:
        domain = resolve_domain(args.domain, args.domains_file, args.libvirt_uri)
        return profile_build.profile_for_domain(domain, args.cache_dir)
    path = Path(args.path)
    if path.is_file() and (path.name.endswith(".json") or path.name.endswith(".json.xz")):
        return profile_build.load_profile(path)
    return profile_build.build_profile(path, args.cache_dir)


def run_show(args: argparse.Namespace) -> int:
    p = _show_profile(args)
    if args.struct:
        layout = p.struct(args.struct)
        members = sorted(layout.members.items(), key=lambda kv: (kv[1].offset, kv[1].bit_offset))
        if args.json:
            print(
                json.dumps(
                    {
                        "name": layout.name,
                        "size": layout.size,
                        "members": {
                            name: {
                                "offset": m.offset,
                                "type": m.type_name,
                                "size": m.size,
                                "bit_offset": m.bit_offset,
                                "bit_size": m.bit_size,
                            }
                            for name, m in members
                        },
                    },
                    indent=1,
                )
            )
            return 0
        print(f"struct {layout.name}  /* size {layout.size} */")
        for name, m in members:
            bits = f":{m.bit_size}@{m.bit_offset}" if m.bit_size else ""
            print(f"  {m.offset:6d} {m.size:5d}  {m.type_name:<32} {name}{bits}")
        return 0
    if args.symbol:
        address = p.symbol(args.symbol)
        kind = p.symbol_types.get(args.symbol, "")
        if args.json:
            print(json.dumps({"name": args.symbol, "address": address, "type": kind}))
        else:
            print(f"{address:016x} {args.symbol}" + (f"  (struct {kind})" if kind else ""))
        return 0
    summary = {
        "release": p.release,
        "banner": p.banner.rstrip("\n"),
        "structs": len(p.structs),
        "symbols": len(p.symbols),
        "symbol_types": dict(p.symbol_types),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        for key, value in summary.items():
            print(f"{key:<13}{value}")
    return 0
