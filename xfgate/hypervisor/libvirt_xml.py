"""A libvirt domain's live XML, read into what xfgate needs (pure: no libvirt, no I/O).

Only what `virsh dumpxml` of a running domain carries is used: its name, UUID and runtime id,
its NICs' host-side devices (``<interface><target dev='vnet3'/>``: the tap QEMU writes to),
their MACs, its memory size, and optional xfgate metadata (``<metadata><xfgate:domain>``) that
names the guest kernel's package for the profile and the guest's addresses. The metadata is
what `virsh metadata` or the lab writes; a domain without it still works with `--profile`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from xfgate.errors import ConfigError

XFGATE_METADATA_NS = "urn:xfgate:domain:1"
MAX_INTERFACES = 64  # a domain definition is not hostile, but every loop is bounded


@dataclass(frozen=True)
class Interface:
    dev: str  # the host-side tap ("vnet3", "tap101i0"); "" if libvirt gave none (not running)
    mac: str
    kind: str  # libvirt's interface type: bridge, network, ethernet, ...
    bridge: str = ""


@dataclass(frozen=True)
class KernelMetadata:
    package: str = ""
    release: str = ""
    assets: str = ""


@dataclass(frozen=True)
class DomainXml:
    name: str
    uuid: str
    runtime_id: int  # libvirt's id of a running domain; -1 when shut off
    interfaces: tuple[Interface, ...]
    memory_kib: int
    kernel: KernelMetadata
    addresses: tuple[str, ...]

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(i.dev for i in self.interfaces if i.dev)


_UNIT_KIB = {"b": 1 / 1024, "bytes": 1 / 1024, "k": 1, "kib": 1, "kb": 1000 / 1024}
_UNIT_KIB |= {"m": 1024, "mib": 1024, "mb": 1000**2 / 1024, "g": 1024**2, "gib": 1024**2}


def _memory_kib(elem: ET.Element | None) -> int:
    if elem is None or not (elem.text or "").strip().isdigit():
        return 0
    factor = _UNIT_KIB.get(elem.get("unit", "KiB").lower(), 1)
    return int(int((elem.text or "0").strip()) * factor)


def parse_domain_xml(text: str) -> DomainXml:
    """The live XML of one domain (`virDomainGetXMLDesc(0)`) to a DomainXml."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ConfigError(f"libvirt domain XML is not valid XML: {e}") from e
    if root.tag != "domain":
        raise ConfigError(f"libvirt domain XML has root <{root.tag}>, expected <domain>")
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip().lower()
    if not name or not uuid:
        raise ConfigError("libvirt domain XML lacks <name> or <uuid>")
    try:
        runtime_id = int(root.get("id", "-1"))
    except ValueError:
        runtime_id = -1
    interfaces = []
    for iface in root.findall("./devices/interface")[:MAX_INTERFACES]:
        target, mac, source = iface.find("target"), iface.find("mac"), iface.find("source")
        interfaces.append(
            Interface(
                dev=target.get("dev", "") if target is not None else "",
                mac=(mac.get("address", "") if mac is not None else "").lower(),
                kind=iface.get("type", ""),
                bridge=source.get("bridge", "") if source is not None else "",
            )
        )
    meta = root.find(f"./metadata/{{{XFGATE_METADATA_NS}}}domain")
    kernel = KernelMetadata()
    addresses: tuple[str, ...] = ()
    if meta is not None:
        k = meta.find(f"{{{XFGATE_METADATA_NS}}}kernel")
        if k is not None:
            kernel = KernelMetadata(k.get("package", ""), k.get("release", ""), k.get("assets", ""))
        addresses = tuple(
            (a.text or "").strip()
            for a in meta.findall(f"{{{XFGATE_METADATA_NS}}}address")[:MAX_INTERFACES]
            if (a.text or "").strip()
        )
    return DomainXml(
        name=name,
        uuid=uuid,
        runtime_id=runtime_id,
        interfaces=tuple(interfaces),
        memory_kib=_memory_kib(root.find("memory")),
        kernel=kernel,
        addresses=addresses,
    )


def metadata_xml(kernel: KernelMetadata, addresses: tuple[str, ...]) -> str:
    """The xfgate metadata element (the lab puts it in its domains; `virsh metadata` too)."""
    el = ET.Element("xfgate:domain", {"xmlns:xfgate": XFGATE_METADATA_NS})
    ET.SubElement(
        el,
        "xfgate:kernel",
        {"package": kernel.package, "release": kernel.release, "assets": kernel.assets},
    )
    for a in addresses:
        ET.SubElement(el, "xfgate:address").text = a
    return ET.tostring(el, encoding="unicode")
