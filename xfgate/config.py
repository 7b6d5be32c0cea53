"""The domains file: which guests xfgate knows, where their memory, monitor and vifs are.

Written by `xfgate-lab up` for the demo guest, or by hand (or by a hosting stack) for real ones.
Read-only for the rest of xfgate. Format (TOML)::

    [[domain]]
    id = 1
    name = "guest1"
    vifs = ["vif1.0"]
    netns = "xfgate-dom0"          # network namespace holding the bridge/vifs ("" = the host's)
    addresses = ["198.18.1.1", "2001:2::1:1"]   # informative
    [domain.memory]
    backend = "qemu-shm"           # qemu-shm | qemu-process | elf-dump | raw | libvmi
    path = "/dev/shm/xfgate-guest1.mem"   # not for qemu-process (needs [domain.qmp] or libvirt)
    [domain.qmp]
    socket = "/run/xfgate/lab/guest1/qmp.sock"
    pid = 1234                     # qemu pid, when known (must match the socket's peer)
    [domain.libvirt]               # optional: the domain as libvirt knows it
    uri = "qemu:///system"
    uuid = "6f1c..."
    [domain.kernel]
    package = "linux-image-6.1.0-56-amd64"
    release = "6.1.0-56-amd64"
    assets = "/var/cache/xfgate/kernels/linux-image-6.1.0-56-amd64"
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xfgate.errors import ConfigError, DomainNotFound

DEFAULT_DOMAINS_FILE = Path("/run/xfgate/domains.toml")
DEFAULT_CACHE_DIR = Path("/var/cache/xfgate")  # kernel assets and profiles, kept across runs
DEFAULT_RUN_DIR = Path("/run/xfgate")  # control sockets, poll-mode rule logs
DEFAULT_LIBVIRT_URI = "qemu:///system"  # where `--domain NAME` looks when the file has no NAME
DEFAULT_POLICY_FILE = Path("/etc/xfgate/policy.toml")  # `xfgate serve`'s rules
DEFAULT_AUDIT_LOG = Path("/var/log/xfgate/audit.jsonl")  # every change of that policy


@dataclass(frozen=True)
class MemoryConfig:
    backend: str
    path: str


@dataclass(frozen=True)
class QmpConfig:
    socket: str
    pid: int = 0


@dataclass(frozen=True)
class KernelConfig:
    package: str = ""
    release: str = ""
    assets: str = ""


@dataclass(frozen=True)
class LibvirtConfig:
    """Where a domain found through libvirt lives (xfgate/hypervisor/libvirt.py builds it)."""

    uri: str
    uuid: str
    name: str = ""
    pid: int = 0  # the domain's QEMU, found at lookup (never written to the file)


@dataclass(frozen=True)
class DomainConfig:
    id: int
    name: str
    vifs: tuple[str, ...]
    memory: MemoryConfig
    qmp: QmpConfig | None = None
    kernel: KernelConfig = field(default_factory=KernelConfig)
    netns: str = ""
    addresses: tuple[str, ...] = ()
    libvirt: LibvirtConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vifs"] = list(self.vifs)
        d["addresses"] = list(self.addresses)
        if self.qmp is None:
            del d["qmp"]
        if self.libvirt is None:
            del d["libvirt"]
        return d


MEMORY_BACKENDS = ("qemu-shm", "qemu-process", "elf-dump", "raw", "libvmi")
# Backends that read a running QEMU without a path: the guest RAM of the process itself.
PATHLESS_BACKENDS = ("qemu-process",)


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}: missing key {key!r}")
    value = table[key]
    if not isinstance(value, kind):
        raise ConfigError(f"{where}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def parse_domain(table: dict[str, Any], where: str) -> DomainConfig:
    """One [[domain]] table to a DomainConfig, with an error naming the bad key."""
    dom_id = _require(table, "id", int, where)
    if dom_id < 0:
        raise ConfigError(f"{where}: id must be >= 0, got {dom_id}")
    mem = _require(table, "memory", dict, where)
    backend = _require(mem, "backend", str, f"{where}.memory")
    if backend not in MEMORY_BACKENDS:
        raise ConfigError(
            f"{where}.memory: backend {backend!r} unknown (one of {', '.join(MEMORY_BACKENDS)})"
        )
    qmp_table = table.get("qmp")
    qmp = None
    if qmp_table is not None:
        qmp = QmpConfig(
            socket=_require(qmp_table, "socket", str, f"{where}.qmp"),
            pid=int(qmp_table.get("pid", 0)),
        )
    libvirt_table = table.get("libvirt")
    libvirt = None
    if libvirt_table is not None:
        libvirt = LibvirtConfig(
            uri=_require(libvirt_table, "uri", str, f"{where}.libvirt"),
            uuid=_require(libvirt_table, "uuid", str, f"{where}.libvirt"),
            name=str(libvirt_table.get("name", "")),
        )
    if backend in PATHLESS_BACKENDS:
        if qmp is None and libvirt is None:
            raise ConfigError(
                f"{where}: backend {backend!r} needs a [domain.qmp] socket"
                " or a [domain.libvirt] table"
            )
        path = str(mem.get("path", ""))
    else:
        path = _require(mem, "path", str, f"{where}.memory")
    kernel_table = table.get("kernel", {})
    vifs = table.get("vifs", [])
    if not isinstance(vifs, list) or not all(isinstance(v, str) for v in vifs):
        raise ConfigError(f"{where}: 'vifs' must be a list of interface names")
    return DomainConfig(
        id=dom_id,
        name=str(table.get("name", f"domain{dom_id}")),
        vifs=tuple(vifs),
        memory=MemoryConfig(backend=backend, path=path),
        qmp=qmp,
        kernel=KernelConfig(
            package=str(kernel_table.get("package", "")),
            release=str(kernel_table.get("release", "")),
            assets=str(kernel_table.get("assets", "")),
        ),
        netns=str(table.get("netns", "")),
        addresses=tuple(str(a) for a in table.get("addresses", [])),
        libvirt=libvirt,
    )


def load_domains(path: Path) -> dict[int, DomainConfig]:
    """All domains in the file, by id. A missing file is an empty set, not an error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read domains file {path}: {e}") from e
    import tomllib  # imported on use (`xfgate ps`'s start-up is part of its answer time)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"domains file {path} is not valid TOML: {e}") from e
    domains: dict[int, DomainConfig] = {}
    for i, table in enumerate(data.get("domain", [])):
        dom = parse_domain(table, f"{path}: domain[{i}]")
        if dom.id in domains:
            raise ConfigError(f"{path}: domain id {dom.id} appears twice")
        domains[dom.id] = dom
    return domains


def get_domain(domain: int, path: Path) -> DomainConfig:
    domains = load_domains(path)
    if domain not in domains:
        raise DomainNotFound(domain, sorted(domains), str(path))
    return domains[domain]


def save_domains(domains: dict[int, DomainConfig], path: Path) -> None:
    """Atomically rewrite the domains file (write a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    body = {"domain": [domains[k].to_dict() for k in sorted(domains)]}
    import tomli_w

    tmp.write_text(tomli_w.dumps(body))
    os.replace(tmp, path)
