"""`--domain SPEC` for every command: an id, a name or a UUID, over the domains file first,
then libvirt (when a URI is given). The domains file never needs libvirt: a spec it answers is
never looked up elsewhere, and a missing or stopped libvirt only adds a sentence to "unknown".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfgate.config import DomainConfig, load_domains
from xfgate.errors import ConfigError, DomainNotFound, PrerequisiteError, XfgateError
from xfgate.hypervisor.libvirt import LibvirtHost, is_uuid
from xfgate.vmi.liveness import is_domains_qemu, qemu_cmdline

log = logging.getLogger("xfgate.resolve")
NO_LIBVIRT = ("", "none")  # --libvirt-uri values that turn libvirt off

HostFactory = Callable[[str], LibvirtHost]


def libvirt_enabled(uri: str) -> bool:
    return uri.strip().lower() not in NO_LIBVIRT


def match_file(spec: str, known: dict[int, DomainConfig]) -> DomainConfig | None:
    """The domains-file entry the spec names: its id, its name, or its libvirt UUID."""
    if spec.isdigit() and int(spec) in known:
        return known[int(spec)]
    lowered = spec.lower()
    hits = [
        d
        for d in known.values()
        if d.name == spec or (d.libvirt is not None and d.libvirt.uuid.lower() == lowered)
    ]
    if len(hits) > 1:
        ids = ", ".join(str(d.id) for d in hits)
        raise ConfigError(
            f"{spec!r} names several domains in the domains file (ids {ids}): give the id"
        )
    return hits[0] if hits else None


def resolve_domain(
    spec: str | int,
    domains_file: Path,
    libvirt_uri: str = "",
    open_host: HostFactory = LibvirtHost,
) -> DomainConfig:
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("--domain needs an id, a name or a UUID")
    known = load_domains(domains_file)
    found = match_file(spec, known)
    if found is not None:
        return found
    if not libvirt_enabled(libvirt_uri):
        raise DomainNotFound(spec, sorted(known), str(domains_file))
    try:
        host = open_host(libvirt_uri)
    except PrerequisiteError as e:
        raise DomainNotFound(spec, sorted(known), str(domains_file), f"libvirt: {e}") from e
    with host:
        dom = host.lookup(spec)
        if dom is None:
            what = "UUID" if is_uuid(spec) else "name or id"
            raise DomainNotFound(
                spec,
                sorted(known),
                str(domains_file),
                f"libvirt at {libvirt_uri} has no such {what}",
            )
        cfg = host.domain_config(dom)
    if cfg.id in known:
        raise ConfigError(
            f"libvirt domain {cfg.name} has id {cfg.id}, which the domains file {domains_file} "
            f"gives to {known[cfg.id].name}: the ids of gated domains must differ (renumber the "
            "file's entry)"
        )
    return cfg


def resolve_id(spec: str | int, domains_file: Path, libvirt_uri: str = "") -> int:
    """The domain id a spec names (for commands that talk to a running gate by id)."""
    if isinstance(spec, int) or str(spec).strip().isdigit():
        return int(spec)  # ids talk to gates directly: no libvirt round trip
    return resolve_domain(spec, domains_file, libvirt_uri).id


# ---- `xfgate domains` -------------------------------------------------------------------------


@dataclass(frozen=True)
class VisibleDomain:
    source: str  # file | qemu | libvirt
    id: int
    name: str
    uuid: str
    pid: int
    state: str
    vifs: tuple[str, ...]
    memory_backend: str
    netns: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "id": self.id,
            "name": self.name,
            "uuid": self.uuid,
            "pid": self.pid,
            "state": self.state,
            "vifs": list(self.vifs),
            "memory_backend": self.memory_backend,
            "netns": self.netns,
        }


def file_state(dom: DomainConfig, cmdline: Callable[[int], list[str]] = qemu_cmdline) -> str:
    """A domains-file entry's state as far as the file lets us tell, without a monitor call."""
    pid = dom.qmp.pid if dom.qmp else 0
    if not pid:
        return "unknown"
    args = cmdline(pid)
    if dom.memory.backend == "qemu-shm":
        return "running" if is_domains_qemu(args, dom.memory.path) else "gone"
    return "running" if args and "qemu" in Path(args[0]).name else "gone"


def visible_domains(
    domains_file: Path, libvirt_uri: str, open_host: HostFactory = LibvirtHost
) -> tuple[list[VisibleDomain], list[str]]:
    """Every domain xfgate can see and how, plus notes on what it could not look at."""
    out: list[VisibleDomain] = []
    notes: list[str] = []
    for d in sorted(load_domains(domains_file).values(), key=lambda x: x.id):
        out.append(
            VisibleDomain(
                source="qemu" if d.memory.backend == "qemu-process" else "file",
                id=d.id,
                name=d.name,
                uuid=d.libvirt.uuid if d.libvirt else "",
                pid=d.qmp.pid if d.qmp else 0,
                state=file_state(d),
                vifs=d.vifs,
                memory_backend=d.memory.backend,
                netns=d.netns,
            )
        )
    if not libvirt_enabled(libvirt_uri):
        return out, notes
    try:
        host = open_host(libvirt_uri)
    except PrerequisiteError as e:
        notes.append(f"libvirt not looked at: {e}")
        return out, notes
    with host:
        for dom in host.all_domains()[:4096]:
            v = host.view(dom)
            out.append(
                VisibleDomain(
                    source="libvirt",
                    id=v.runtime_id,
                    name=v.name,
                    uuid=v.uuid,
                    pid=v.pid,
                    state=v.state,
                    vifs=v.taps,
                    memory_backend="qemu-process",
                    netns=_netns_or_note(host, v.pid, notes),
                )
            )
    return out, notes


def _netns_or_note(host: LibvirtHost, pid: int, notes: list[str]) -> str:
    if pid <= 0:
        return ""
    try:
        return host.find_netns(pid)
    except Exception as e:
        notes.append(str(e))
        return "?"


def gateable_domains_source(
    domains_file: Path, libvirt_uri: str, open_host: HostFactory = LibvirtHost
) -> Callable[[], list[DomainConfig]]:
    """`xfgate serve`'s DomainSource: the domains file's entries, plus every running libvirt
    domain (`libvirt_uri` "" or none: the file only). A libvirt domain whose runtime id is an
    id of the file is skipped (they would share chains), said in the log. A libvirt that
    answered once and then does not raises, so the service keeps its domains as they are; a
    host with no libvirt at all is served from the file."""
    seen_libvirt = False

    def source() -> list[DomainConfig]:
        nonlocal seen_libvirt
        file_domains = load_domains(domains_file)
        out = list(file_domains.values())
        if not libvirt_enabled(libvirt_uri):
            return out
        try:
            host = open_host(libvirt_uri)
        except PrerequisiteError as e:
            if seen_libvirt:
                raise
            log.debug("serve: libvirt not looked at: %s", e)
            return out
        seen_libvirt = True
        with host:
            for dom in host.all_domains()[:4096]:
                try:
                    cfg = host.domain_config(dom)
                except XfgateError as e:  # shut off, no QEMU found: not gateable now
                    log.debug("serve: libvirt domain skipped: %s", e)
                    continue
                if cfg.id in file_domains:
                    log.warning(
                        "libvirt domain %s has runtime id %d, which the domains file uses too: "
                        "not gated (renumber the file's entry)",
                        cfg.name,
                        cfg.id,
                    )
                    continue
                out.append(cfg)
        return out

    return source
