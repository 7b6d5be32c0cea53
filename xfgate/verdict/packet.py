"""Raw IPv4/IPv6 bytes (as NFQUEUE hands them over) to the fields a verdict needs.

Pure and exception-free: anything malformed becomes a ``Malformed`` with a reason, because the
caller must still give the packet a verdict. No scapy here: this runs once per queued packet.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from xfgate.flow import Direction, Flow, IPAddress
from xfgate.inet import IPProto

# IPv6 extension headers with the generic (next header, length in 8-octet units - 1) layout.
IPV6_GENERIC_EXT = frozenset(
    {IPProto.HOPOPTS, IPProto.ROUTING, IPProto.DSTOPTS, IPProto.MH, IPProto.HIP, IPProto.SHIM6}
)
MAX_IPV6_EXT_HEADERS = 8  # a hostile chain of extension headers must not cost more than this

ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})  # unreach, quench, redirect, time exceeded, param
ICMPV6_ERROR_TYPES = frozenset({1, 2, 3, 4})  # unreach, too big, time exceeded, param problem
# Neighbour discovery (RS, RA, NS, NA, redirect) and multicast listener discovery (MLD query,
# v1 report and done, v2 report): the link itself, sent by the guest kernel.
ICMPV6_NDP_TYPES = frozenset({133, 134, 135, 136, 137, 130, 131, 132, 143})
# Echo request/reply: what a ping socket (net/ipv4/ping.c) sends and receives, keyed by the
# echo identifier (the socket's inet_num).
ICMP_ECHO_TYPES = frozenset({8, 0})
ICMPV6_ECHO_TYPES = frozenset({128, 129})
ECHO_REQUEST_TYPES = frozenset({8, 128})
# Protocols with UDP's source/destination port header.
PORTED_PROTOS = frozenset({IPProto.TCP, IPProto.UDP, IPProto.UDPLITE})


@dataclass(frozen=True, slots=True)
class ParsedPacket:
    family: int  # 4 or 6
    proto: int  # transport protocol after IPv6 extension headers
    src: IPAddress
    dst: IPAddress
    sport: int = 0  # 0 when the packet carries no ports (fragment, ICMP, other protocols)
    dport: int = 0
    tcp_flags: int = 0
    fragment: bool = False  # a non-first fragment: no transport header to read
    icmp_type: int = -1
    echo_id: int = -1  # ICMP/ICMPv6 echo request/reply: the identifier (a ping socket's port)
    # For ICMP errors: the header of the packet that caused the error (its ports included).
    embedded: ParsedPacket | None = None

    @property
    def has_ports(self) -> bool:
        return self.proto in PORTED_PROTOS and not self.fragment

    @property
    def is_icmp_error(self) -> bool:
        return self.embedded is not None


@dataclass(frozen=True, slots=True)
class Malformed:
    reason: str


ParseResult = ParsedPacket | Malformed


def parse(data: bytes) -> ParseResult:
    """Parse one IP packet; ICMP errors get their embedded header parsed too (one level)."""
    return _parse(data, allow_embedded=True)


def _parse(data: bytes, allow_embedded: bool) -> ParseResult:
    if not data:
        return Malformed("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _parse_ipv4(data, allow_embedded)
    if version == 6:
        return _parse_ipv6(data, allow_embedded)
    return Malformed(f"IP version {version}")


def _parse_ipv4(data: bytes, allow_embedded: bool) -> ParseResult:
    if len(data) < 20:
        return Malformed(f"truncated IPv4 header ({len(data)} bytes)")
    ihl = (data[0] & 0x0F) * 4
    if ihl < 20:
        return Malformed(f"IPv4 header length {ihl} < 20")
    if len(data) < ihl:
        return Malformed(f"truncated IPv4 options ({len(data)} < {ihl} bytes)")
    frag_offset = int.from_bytes(data[6:8], "big") & 0x1FFF
    proto = data[9]
    src = IPv4Address(data[12:16])
    dst = IPv4Address(data[16:20])
    if frag_offset:
        return ParsedPacket(4, proto, src, dst, fragment=True)
    return _parse_transport(4, proto, src, dst, data[ihl:], allow_embedded)


def _parse_ipv6(data: bytes, allow_embedded: bool) -> ParseResult:
    if len(data) < 40:
        return Malformed(f"truncated IPv6 header ({len(data)} bytes)")
    src = IPv6Address(data[8:24])
    dst = IPv6Address(data[24:40])
    next_header = data[6]
    offset = 40
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if next_header in IPV6_GENERIC_EXT or next_header == IPProto.AH:
            if len(data) < offset + 2:
                return Malformed(f"truncated IPv6 extension header {next_header}")
            # AH counts its length in 4-octet units (RFC 4302), the others in 8-octet units.
            unit = 4 if next_header == IPProto.AH else 8
            length = (data[offset + 1] + (2 if next_header == IPProto.AH else 1)) * unit
            next_header = data[offset]
            offset += length
            if len(data) < offset:
                return Malformed("IPv6 extension header runs past the packet end")
        elif next_header == IPProto.FRAGMENT:
            if len(data) < offset + 8:
                return Malformed("truncated IPv6 fragment header")
            frag_offset = int.from_bytes(data[offset + 2 : offset + 4], "big") >> 3
            following = data[offset]
            offset += 8
            if frag_offset:
                return ParsedPacket(6, following, src, dst, fragment=True)
            next_header = following
        else:
            return _parse_transport(6, next_header, src, dst, data[offset:], allow_embedded)
    return Malformed(f"more than {MAX_IPV6_EXT_HEADERS} IPv6 extension headers")


def _parse_transport(
    family: int,
    proto: int,
    src: IPAddress,
    dst: IPAddress,
    l4: bytes,
    allow_embedded: bool,
) -> ParseResult:
    if proto == IPProto.TCP:
        # Inside an ICMP error only the first 8 bytes of the transport header are guaranteed.
        need = 20 if allow_embedded else 4
        if len(l4) < need:
            return Malformed(f"truncated TCP header ({len(l4)} bytes)")
        flags = l4[13] if len(l4) >= 14 else 0
        return ParsedPacket(
            family, proto, src, dst, _u16(l4, 0), _u16(l4, 2), tcp_flags=flags & 0x3F
        )
    if proto in (IPProto.UDP, IPProto.UDPLITE):
        need = 8 if allow_embedded else 4
        if len(l4) < need:
            return Malformed(f"truncated UDP header ({len(l4)} bytes)")
        return ParsedPacket(family, proto, src, dst, _u16(l4, 0), _u16(l4, 2))
    if proto in (IPProto.ICMP, IPProto.ICMPV6):
        if len(l4) < 4:
            return Malformed(f"truncated ICMP header ({len(l4)} bytes)")
        icmp_type = l4[0]
        errors = ICMP_ERROR_TYPES if proto == IPProto.ICMP else ICMPV6_ERROR_TYPES
        embedded: ParsedPacket | None = None
        echoes = ICMP_ECHO_TYPES if proto == IPProto.ICMP else ICMPV6_ECHO_TYPES
        if icmp_type in echoes:
            if len(l4) < 8:
                return Malformed(f"truncated ICMP echo header ({len(l4)} bytes)")
            return ParsedPacket(family, proto, src, dst, icmp_type=icmp_type, echo_id=_u16(l4, 4))
        if allow_embedded and icmp_type in errors:
            inner = _parse(l4[8:], allow_embedded=False)
            if isinstance(inner, Malformed):
                return Malformed(f"ICMP error with a bad embedded packet: {inner.reason}")
            embedded = inner
        return ParsedPacket(family, proto, src, dst, icmp_type=icmp_type, embedded=embedded)
    return ParsedPacket(family, proto, src, dst)


def _u16(b: bytes, at: int) -> int:
    return (b[at] << 8) | b[at + 1]


def to_flow(packet: ParsedPacket, direction: Direction) -> Flow:
    """The flow as the guest's socket sees it: local = the guest's end.

    An ICMP error is about the packet it embeds, which travelled the other way: its flow is the
    embedded packet's flow in the opposite direction. An ICMP/ICMPv6 echo is keyed as a ping
    socket is (lport = the echo identifier, rport 0); any other packet without ports (other
    protocols, non-first fragments) gets ports 0: a raw socket of that protocol may send it.
    """
    if packet.embedded is not None:
        opposite = Direction.TO_GUEST if direction is Direction.FROM_GUEST else Direction.FROM_GUEST
        return to_flow(packet.embedded, opposite)
    guest_src = direction is Direction.FROM_GUEST
    local, remote = (packet.src, packet.dst) if guest_src else (packet.dst, packet.src)
    if packet.echo_id >= 0:
        return Flow(packet.proto, local, packet.echo_id, remote, 0)
    if not packet.has_ports:
        return Flow(packet.proto, local, 0, remote, 0)
    if guest_src:
        return Flow(packet.proto, packet.src, packet.sport, packet.dst, packet.dport)
    return Flow(packet.proto, packet.dst, packet.dport, packet.src, packet.sport)


def direction_of(
    physindev: int, physoutdev: int, vif_ifindexes: frozenset[int]
) -> Direction | None:
    """Which way a bridged packet crosses the domain's vif(s), from NFQUEUE's phys ifindexes."""
    if physindev in vif_ifindexes:
        return Direction.FROM_GUEST
    if physoutdev in vif_ifindexes:
        return Direction.TO_GUEST
    return None
