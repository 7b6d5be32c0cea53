"""Kernel-side blocks that name exactly what they block (pure builders).

A blocked socket becomes set entries keyed the way the guest kernel keys the socket, per family:

- a listening or bound-only socket: (guest address, proto:port) in ``xfgate-D-port4|6``
  (``hash:net,port``); the wildcard address is the family's two /1 halves (``hash:net`` takes no
  /0), so a [::]:8080 blocks only IPv6 unless the socket also takes IPv4 (``v6only`` False), and
  a socket bound to one address leaves the same port on the guest's other addresses alone;
- a connected socket: (guest address, proto:port, remote address) in ``xfgate-D-flow4|6``
  (``hash:ip,port,ip``): a port another process just left, or uses towards another peer, stays
  free.

The rules match a packet from the guest on its source (``src,src`` / ``src,src,dst``) and one
to the guest on its destination (``dst,dst`` / ``dst,dst,src``); the protocol is part of the
entry (``tcp:80``, ``udp:53``, ``udplite:9``), so one set serves every port protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from xfgate.flow import GuestSocket, IPAddress
from xfgate.inet import IPProto, proto_label
from xfgate.verdict.nfnetlink import SetEntry, SetType
from xfgate.verdict.policy import NO_FACTS, GuestFacts, Policy, socket_blocked

# The protocols ipset's "port" entries know and a guest socket has ports for.
SET_PROTOS = frozenset({IPProto.TCP, IPProto.UDP, IPProto.UDPLITE})
AF_INET, AF_INET6 = 2, 10
WILDCARD = {4: ("0.0.0.0/1", "128.0.0.0/1"), 6: ("::/1", "8000::/1")}
PORT_SET = {
    4: SetType("hash:net,port", AF_INET, "net,port"),
    6: SetType("hash:net,port", AF_INET6, "net,port"),
}
FLOW_SET = {
    4: SetType("hash:ip,port,ip", AF_INET, "ip,port,ip"),
    6: SetType("hash:ip,port,ip", AF_INET6, "ip,port,ip"),
}


@dataclass(frozen=True, slots=True, order=True)
class BlockEntry:
    """One set entry: ``remote`` empty for a port entry (``local`` is then a network)."""

    family: int
    proto: int
    port: int
    local: str
    remote: str = ""

    @property
    def is_flow(self) -> bool:
        return bool(self.remote)

    def __str__(self) -> str:
        """As `ipset list` prints the member: ``0.0.0.0/1,tcp:8080``, ``a,udp:53,b``."""
        middle = f"{proto_label(self.proto)}:{self.port}"
        if self.remote:
            return f"{self.local},{middle},{self.remote}"
        return f"{self.local},{middle}"


def port_set_name(domain: int, family: int) -> str:
    return f"xfgate-{domain}-port{family}"


def flow_set_name(domain: int, family: int) -> str:
    return f"xfgate-{domain}-flow{family}"


def set_names(domain: int) -> list[str]:
    return [f(domain, fam) for fam in (4, 6) for f in (port_set_name, flow_set_name)]


def _v4(addr: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 socket's v4-mapped address stands for."""
    return addr.ipv4_mapped if isinstance(addr, IPv6Address) else addr


def _host(addr: IPAddress) -> str:
    return str(addr)  # a host: ipset stores and prints it without /32, /128


def socket_entries(s: GuestSocket) -> list[BlockEntry]:
    """The entries that block exactly socket `s` (none for a protocol without ports)."""
    if s.proto not in SET_PROTOS or not 0 < s.lport < 65536:
        return []
    local, remote = s.local, s.remote
    if local.version == 6 and (mapped := _v4(local)) is not None:
        # An IPv6 socket bound or connected to a v4-mapped address talks IPv4.
        local = mapped
        if remote.version == 6:
            remote = _v4(remote) or IPv4Address(0)
    connected = 0 < s.rport < 65536 and not remote.is_unspecified
    if connected and not local.is_unspecified:
        return [BlockEntry(local.version, s.proto, s.lport, str(local), str(remote))]
    families = [local.version]
    if local.version == 6 and local.is_unspecified and not s.v6only:
        families.append(4)  # [::] without IPV6_V6ONLY takes IPv4 too
    out: list[BlockEntry] = []
    for fam in families:
        nets = WILDCARD[fam] if local.is_unspecified else (_host(local),)
        out += [BlockEntry(fam, s.proto, s.lport, net) for net in nets]
    return out


def port_entries(proto: int, port: int) -> list[BlockEntry]:
    """A port blocked outright (``--block-port``): every guest address, both families."""
    if proto not in SET_PROTOS or not 0 < port < 65536:
        return []
    return [BlockEntry(fam, proto, port, net) for fam in (4, 6) for net in WILDCARD[fam]]


def set_contents(domain: int, entries: Iterable[BlockEntry]) -> dict[str, list[BlockEntry]]:
    """Set name -> its sorted entries, for every set of the domain (empty lists too)."""
    out: dict[str, list[BlockEntry]] = {name: [] for name in set_names(domain)}
    for e in sorted(set(entries)):
        name = (flow_set_name if e.is_flow else port_set_name)(domain, e.family)
        out[name].append(e)
    return out


def set_type(name: str) -> SetType:
    """The type of one of our sets, from its name."""
    family = 6 if name.removesuffix("-new").endswith("6") else 4
    return FLOW_SET[family] if "-flow" in name else PORT_SET[family]


def set_entry(e: BlockEntry) -> SetEntry:
    """The entry as the set adapter takes it: (address, (port, proto)[, address])."""
    if e.is_flow:
        return (e.local, (e.port, e.proto), e.remote)
    return (e.local, (e.port, e.proto))


def parse_member(text: str, family: int) -> BlockEntry:
    """The inverse of ``str(BlockEntry)`` (the `ipset` program's member syntax)."""
    parts = text.split(",")
    proto_name, _, port = parts[1].partition(":")
    proto = IPProto.from_label(proto_name)
    local = parts[0]
    if len(parts) == 3:
        return BlockEntry(family, proto, int(port), str(ip_address(local)), parts[2])
    return BlockEntry(family, proto, int(port), local)


def ports_text(entries: Iterable[BlockEntry]) -> list[str]:
    """``proto/port`` of every entry, sorted and unique (the status's short form)."""
    return sorted({f"{proto_label(e.proto)}/{e.port}" for e in entries})


def blocked_entries(
    sockets: Iterable[GuestSocket], policy: Policy, facts: GuestFacts = NO_FACTS
) -> set[BlockEntry]:
    """What the domain's sets must hold: every socket the policy blocks (by holder, or by
    creator when no visible task holds it; never TIME_WAIT), and the ports blocked outright."""
    out = {e for proto, port in policy.block_ports for e in port_entries(proto, port)}
    for s in sockets:
        if socket_blocked(s, policy, facts):
            out.update(socket_entries(s))
    return out
