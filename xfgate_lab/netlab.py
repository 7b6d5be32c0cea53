"""A private, throw-away network lab for the verdict engine's tests and benchmarks.

Three namespaces, no route out of them: ``<prefix>-d`` ("dom0": bridge + the guest's vif, where
the gate runs), ``<prefix>-g`` (a stand-in guest behind ``vif9.0``, a veth) and ``<prefix>-c``
(the client). Addresses from 198.18.0.0/15 and 2001:2::/48 only. Built from the same pieces as
the QEMU lab (`namespaces`); the traffic is the labs' one peer (``xfgate_lab.peers``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

from xfgate.config import DomainConfig, MemoryConfig, save_domains
from xfgate_lab import namespaces
from xfgate_lab.errors import LabError

GUEST4, CLIENT4 = "198.18.9.2", "198.18.9.1"
GUEST6, CLIENT6 = "2001:2:0:9::2", "2001:2:0:9::1"
DOMAIN = 9
VIF = "vif9.0"
# The optional second guest (domain 8), for a gate serving two domains.
GUEST8_4, GUEST8_6, VIF8 = "198.18.9.3", "2001:2:0:9::3", "vif8.0"
DOMAIN8 = 8
BRIDGE = "xfbr0"
CLIENT_PORT = "cl0"
IFACE = "eth0"  # the guest's and the client's end of their veth


@dataclass(frozen=True)
class NetLab:
    prefix: str
    workdir: Path

    @property
    def dom0(self) -> str:
        return f"{self.prefix}-d"

    @property
    def guest(self) -> str:
        return f"{self.prefix}-g"

    @property
    def client(self) -> str:
        return f"{self.prefix}-c"

    @property
    def guest8(self) -> str:
        return f"{self.prefix}-g8"

    @property
    def domains_file(self) -> Path:
        return self.workdir / "domains.toml"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "XFGATE_DOMAINS": str(self.domains_file),
            "XFGATE_RUN_DIR": str(self.run_dir),
        }

    def ns(self, name: str, argv: list[str], timeout: float = 20.0, check: bool = True) -> str:
        """Runs `argv` in namespace `name`; its stdout. LabError if it fails and `check`."""
        proc = namespaces.netns_exec(name, argv, timeout)
        if check and proc.returncode != 0:
            raise LabError(f"`{' '.join(argv)}` in netns {name} failed: {proc.stderr.strip()}")
        return proc.stdout

    def python(self, name: str, args: list[str]) -> list[str]:
        """The traffic peer (`xfgate_lab.peers ARGS`) as a command run inside namespace `name`."""
        return ["ip", "netns", "exec", name, sys.executable, "-m", "xfgate_lab.peers", *args]


def _guest(lab: NetLab, domain: int, ns: str, vif: str, v4: str, v6: str) -> DomainConfig:
    """A stand-in guest: namespace `ns` behind veth `vif` on the dom0 bridge."""
    namespaces.add_netns(ns)
    namespaces.add_veth(lab.dom0, vif, ns, IFACE, BRIDGE)
    namespaces.add_addresses(ns, IFACE, [IPv4Interface(f"{v4}/24"), IPv6Interface(f"{v6}/64")])
    return DomainConfig(
        id=domain,
        name=f"{lab.prefix}-guest{'' if domain == DOMAIN else domain}",
        vifs=(vif,),
        memory=MemoryConfig(backend="raw", path="/dev/null"),
        netns=lab.dom0,
        addresses=(v4, v6),
    )


def create(prefix: str, workdir: Path, second_guest: bool = False) -> NetLab:
    lab = NetLab(prefix, workdir)
    destroy(lab)
    workdir.mkdir(parents=True, exist_ok=True)
    lab.run_dir.mkdir(exist_ok=True)
    namespaces.add_netns(lab.dom0)
    namespaces.add_bridge(lab.dom0, BRIDGE)
    namespaces.add_netns(lab.client)
    namespaces.add_veth(lab.dom0, CLIENT_PORT, lab.client, IFACE, BRIDGE)
    namespaces.add_addresses(
        lab.client, IFACE, [IPv4Interface(f"{CLIENT4}/24"), IPv6Interface(f"{CLIENT6}/64")]
    )
    domains = [_guest(lab, DOMAIN, lab.guest, VIF, GUEST4, GUEST6)]
    if second_guest:
        domains.append(_guest(lab, DOMAIN8, lab.guest8, VIF8, GUEST8_4, GUEST8_6))
    save_domains({d.id: d for d in domains}, lab.domains_file)
    return lab


def destroy(lab: NetLab) -> None:
    for n in (lab.dom0, lab.guest, lab.client, lab.guest8):
        namespaces.delete_netns(n)
