"""Packet parsing: real packets built with scapy, truncations and hostile headers."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from xfgate.flow import Direction, Flow
from xfgate.inet import IPProto, TCPFlag
from xfgate.verdict.packet import (
    MAX_IPV6_EXT_HEADERS,
    Malformed,
    ParsedPacket,
    direction_of,
    parse,
    to_flow,
)

G4, C4 = "198.18.9.2", "198.18.9.1"
G6, C6 = "2001:2:0:9::2", "2001:2:0:9::1"


def ok(data: bytes) -> ParsedPacket:
    result = parse(data)
    assert isinstance(result, ParsedPacket), result
    return result


def test_tcp_syn_ipv4() -> None:
    p = ok(bytes(IP(src=G4, dst=C4) / TCP(sport=40000, dport=2222, flags="S")))
    assert (p.family, p.proto, str(p.src), p.sport, str(p.dst), p.dport) == (
        4,
        IPProto.TCP,
        G4,
        40000,
        C4,
        2222,
    )
    assert p.tcp_flags == TCPFlag.SYN
    assert to_flow(p, Direction.FROM_GUEST) == Flow(
        IPProto.TCP, ip_address(G4), 40000, ip_address(C4), 2222
    )


def test_to_guest_flow_is_seen_from_the_guest() -> None:
    p = ok(bytes(IP(src=C4, dst=G4) / TCP(sport=5555, dport=80, flags="SA")))
    assert p.tcp_flags == TCPFlag.SYN | TCPFlag.ACK
    assert to_flow(p, Direction.TO_GUEST) == Flow(
        IPProto.TCP, ip_address(G4), 80, ip_address(C4), 5555
    )


def test_udp_ipv6_through_extension_headers() -> None:
    pkt = (
        IPv6(src=G6, dst=C6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrRouting()
        / UDP(sport=9000, dport=5353)
    )
    p = ok(bytes(pkt))
    assert (p.family, p.proto, p.sport, p.dport) == (6, IPProto.UDP, 9000, 5353)


def test_ipv6_first_fragment_has_ports_later_ones_not() -> None:
    first = (
        IPv6(src=G6, dst=C6)
        / IPv6ExtHdrFragment(offset=0, m=1, id=7)
        / UDP(sport=1, dport=2)
        / (b"x" * 16)
    )
    later = IPv6(src=G6, dst=C6) / IPv6ExtHdrFragment(offset=3, m=0, id=7, nh=17) / (b"y" * 16)
    p1, p2 = ok(bytes(first)), ok(bytes(later))
    assert (p1.sport, p1.dport, p1.fragment) == (1, 2, False)
    assert p2.fragment and p2.proto == IPProto.UDP and not p2.has_ports
    # No transport header: keyed as a raw socket of the protocol would be (ports 0).
    assert to_flow(p2, Direction.FROM_GUEST) == Flow(
        IPProto.UDP, ip_address(G6), 0, ip_address(C6), 0
    )


def test_ipv4_fragments() -> None:
    frags = fragment(  # type: ignore[no-untyped-call]
        IP(src=G4, dst=C4) / UDP(sport=53, dport=5353) / (b"z" * 3000), 1000
    )
    parsed = [ok(bytes(f)) for f in frags]
    assert parsed[0].has_ports and parsed[0].dport == 5353
    assert all(p.fragment and not p.has_ports for p in parsed[1:])


def test_icmp_error_carries_the_embedded_flow() -> None:
    # The client says "port unreachable" about a UDP packet the guest sent it.
    inner = IP(src=G4, dst=C4) / UDP(sport=41000, dport=5353)
    err = IP(src=C4, dst=G4) / ICMP(type=3, code=3) / bytes(inner)[:28]
    p = ok(bytes(err))
    assert p.is_icmp_error and p.icmp_type == 3
    assert to_flow(p, Direction.TO_GUEST) == Flow(
        IPProto.UDP, ip_address(G4), 41000, ip_address(C4), 5353
    )


def test_icmpv6_error_and_ndp() -> None:
    inner = IPv6(src=G6, dst=C6) / TCP(sport=9000, dport=7000)
    err = ok(bytes(IPv6(src=C6, dst=G6) / ICMPv6DestUnreach() / bytes(inner)[:48]))
    assert to_flow(err, Direction.TO_GUEST) == Flow(
        IPProto.TCP, ip_address(G6), 9000, ip_address(C6), 7000
    )
    ns = ok(bytes(IPv6(src=G6, dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt=C6)))
    assert ns.icmp_type == 135 and ns.echo_id == -1
    assert to_flow(ns, Direction.FROM_GUEST).lport == 0


def test_icmp_echo_is_keyed_by_its_identifier() -> None:
    # A ping socket's "port" is the echo identifier (net/ipv4/ping.c, ping_lookup).
    p = ok(bytes(IP(src=G4, dst=C4) / ICMP(type=8, id=4242, seq=1)))
    assert not p.is_icmp_error and p.echo_id == 4242
    assert to_flow(p, Direction.FROM_GUEST) == Flow(
        IPProto.ICMP, ip_address(G4), 4242, ip_address(C4), 0
    )
    reply = ok(bytes(IP(src=C4, dst=G4) / ICMP(type=0, id=4242, seq=1)))
    assert to_flow(reply, Direction.TO_GUEST) == Flow(
        IPProto.ICMP, ip_address(G4), 4242, ip_address(C4), 0
    )
    v6 = ok(bytes(IPv6(src=G6, dst=C6) / ICMPv6EchoRequest(id=77)))
    assert v6.echo_id == 77 and to_flow(v6, Direction.FROM_GUEST).lport == 77
    assert isinstance(parse(bytes(IP(src=G4, dst=C4) / ICMP(type=8))[:25]), Malformed)


def test_udplite_has_ports() -> None:
    udp = bytes(UDP(sport=40000, dport=9999))
    p = ok(bytes(IP(src=G4, dst=C4, proto=136) / udp))
    assert p.proto == IPProto.UDPLITE and p.has_ports
    assert to_flow(p, Direction.FROM_GUEST) == Flow(
        IPProto.UDPLITE, ip_address(G4), 40000, ip_address(C4), 9999
    )
    p6 = ok(bytes(IPv6(src=G6, dst=C6, nh=136) / udp))
    assert (p6.proto, p6.sport, p6.dport) == (IPProto.UDPLITE, 40000, 9999)


def test_other_protocols_get_ports_zero() -> None:
    p = ok(bytes(IP(src=G4, dst=C4, proto=47) / (b"\x00" * 8)))
    assert p.proto == 47 and not p.has_ports
    assert to_flow(p, Direction.FROM_GUEST) == Flow(47, ip_address(G4), 0, ip_address(C4), 0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"\x45" + b"\x00" * 10, "truncated IPv4 header"),
        (b"\x75" + b"\x00" * 30, "IP version 7"),
        (b"\x43" + b"\x00" * 30, "header length 12"),
        (b"\x4f" + b"\x00" * 30, "truncated IPv4 options"),
        (bytes(IP(src=G4, dst=C4) / TCP())[:30], "truncated TCP"),
        (bytes(IP(src=G4, dst=C4) / UDP())[:24], "truncated UDP"),
        (bytes(IPv6(src=G6, dst=C6) / TCP())[:39], "truncated IPv6 header"),
        (bytes(IPv6(src=G6, dst=C6) / IPv6ExtHdrHopByHop() / UDP())[:41], "extension header"),
        (bytes(IP(src=G4, dst=C4) / ICMP(type=3) / b"\x45\x00"), "embedded"),
    ],
)
def test_malformed_gets_a_reason_never_an_exception(data: bytes, reason: str) -> None:
    result = parse(data)
    assert isinstance(result, Malformed)
    assert reason in result.reason


def test_extension_header_chain_is_bounded() -> None:
    pkt = IPv6(src=G6, dst=C6)
    for _ in range(MAX_IPV6_EXT_HEADERS + 1):
        pkt = pkt / IPv6ExtHdrDestOpt()
    result = parse(bytes(pkt / UDP()))
    assert isinstance(result, Malformed) and "more than" in result.reason


def test_extension_length_past_end() -> None:
    data = bytearray(bytes(IPv6(src=G6, dst=C6) / IPv6ExtHdrDestOpt() / UDP()))
    data[41] = 200  # claims 1608 bytes of options
    result = parse(bytes(data))
    assert isinstance(result, Malformed) and "past the packet end" in result.reason


def test_every_truncation_of_a_packet_parses_without_exception() -> None:
    samples = [
        bytes(IP(src=G4, dst=C4, options=b"\x01\x01\x01\x00") / TCP(options=[("MSS", 1460)])),
        bytes(IPv6(src=G6, dst=C6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment() / TCP()),
        bytes(IP(src=C4, dst=G4) / ICMP(type=11) / bytes(IP(src=G4, dst=C4) / TCP())[:28]),
    ]
    for data in samples:
        for n in range(len(data) + 1):
            assert isinstance(parse(data[:n]), (ParsedPacket, Malformed))


def test_direction_from_phys_ifindexes() -> None:
    vifs = frozenset({7})
    assert direction_of(7, 0, vifs) is Direction.FROM_GUEST
    assert direction_of(3, 7, vifs) is Direction.TO_GUEST
    assert direction_of(3, 4, vifs) is None
