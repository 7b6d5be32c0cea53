"""A fake of the two libvirt-python modules, enough for xfgate.hypervisor (unit tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from xfgate.hypervisor.libvirt import LibvirtApi

VIR_ERR_NO_DOMAIN = 42
VIR_ERR_OPERATION_INVALID = 55
VIR_ERR_OPERATION_TIMEOUT = 68
VIR_ERR_SYSTEM_ERROR = 38


class FakeLibvirtError(Exception):
    def __init__(self, message: str, code: int = VIR_ERR_SYSTEM_ERROR) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return str(self)


def live_xml(name: str, uuid: str, dom_id: int = 3, taps: tuple[str, ...] = ("vnet0",)) -> str:
    ifaces = "".join(
        f"<interface type='bridge'><mac address='52:54:00:AA:00:0{i}'/>"
        f"<source bridge='br0'/><target dev='{t}'/><model type='virtio'/></interface>"
        for i, t in enumerate(taps)
    )
    id_attr = f" id='{dom_id}'" if dom_id >= 0 else ""
    return (
        f"<domain type='kvm'{id_attr}><name>{name}</name><uuid>{uuid}</uuid>"
        "<metadata><xfgate:domain xmlns:xfgate='urn:xfgate:domain:1'>"
        "<xfgate:kernel package='linux-image-6.1.0-57-amd64' release='6.1.0-57-amd64' assets=''/>"
        "<xfgate:address>198.18.1.1</xfgate:address></xfgate:domain></metadata>"
        f"<memory unit='KiB'>262144</memory><devices>{ifaces}</devices></domain>"
    )


@dataclass
class FakeDomain:
    name: str
    uuid: str
    dom_id: int = 3
    state: int = 1  # VIR_DOMAIN_RUNNING
    taps: tuple[str, ...] = ("vnet0",)
    calls: list[str] = field(default_factory=list)
    monitor_error: FakeLibvirtError | None = None
    replies: dict[str, Any] = field(default_factory=dict)

    def UUIDString(self) -> str:
        return self.uuid

    def XMLDesc(self, flags: int = 0) -> str:
        return live_xml(self.name, self.uuid, self.dom_id if self.state != 5 else -1, self.taps)

    def state_(self) -> list[int]:
        return [self.state, 0]

    def suspend(self) -> int:
        self.calls.append("suspend")
        self.state = 3
        return 0

    def resume(self) -> int:
        self.calls.append("resume")
        self.state = 1
        return 0


class FakeConn:
    def __init__(self, domains: list[FakeDomain]) -> None:
        self.domains = domains
        self.closed = False

    def _find(self, pred: Any) -> Any:
        for d in self.domains:
            if pred(d):
                return _wrap(d)
        raise FakeLibvirtError("Domain not found", VIR_ERR_NO_DOMAIN)

    def lookupByName(self, name: str) -> Any:
        return self._find(lambda d: d.name == name)

    def lookupByUUIDString(self, uuid: str) -> Any:
        return self._find(lambda d: d.uuid == uuid.lower())

    def lookupByID(self, dom_id: int) -> Any:
        return self._find(lambda d: d.dom_id == dom_id and d.state != 5)

    def listAllDomains(self, flags: int = 0) -> list[Any]:
        return [_wrap(d) for d in self.domains]

    def close(self) -> int:
        self.closed = True
        return 0


def _wrap(d: FakeDomain) -> Any:
    """A virDomain-like object: `state(flags)` is a method on the real one."""
    return SimpleNamespace(
        fake=d,
        name=d.name,
        UUIDString=d.UUIDString,
        XMLDesc=d.XMLDesc,
        state=lambda flags=0: d.state_(),
        suspend=d.suspend,
        resume=d.resume,
    )


def fake_api(domains: list[FakeDomain], refuse: str = "") -> LibvirtApi:
    def open_(uri: str) -> FakeConn:
        if refuse:
            raise FakeLibvirtError(refuse)
        return FakeConn(domains)

    def monitor(dom: Any, cmd: str, flags: int) -> str:
        d: FakeDomain = dom.fake
        d.calls.append(("hmp " if flags else "qmp ") + cmd)
        if d.monitor_error is not None:
            raise d.monitor_error
        if flags:
            return str(d.replies.get(cmd, "CR0=80050033 CR2=0 CR3=0000000002bd8000 CR4=000006f0"))
        name = json.loads(cmd)["execute"]
        if name in d.replies:
            return json.dumps(d.replies[name])
        return json.dumps({"error": {"class": "CommandNotFound", "desc": f"no {name}"}})

    libvirt = SimpleNamespace(
        open=open_,
        libvirtError=FakeLibvirtError,
        VIR_ERR_NO_DOMAIN=VIR_ERR_NO_DOMAIN,
        VIR_ERR_OPERATION_INVALID=VIR_ERR_OPERATION_INVALID,
        VIR_ERR_OPERATION_TIMEOUT=VIR_ERR_OPERATION_TIMEOUT,
    )
    return LibvirtApi(libvirt, SimpleNamespace(qemuMonitorCommand=monitor))
