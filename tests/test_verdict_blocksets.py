"""Kernel-side blocks name exactly what they block: family, guest address, protocol, port, peer."""

from __future__ import annotations

from ipaddress import ip_address

from xfgate.flow import GuestSocket, Owner
from xfgate.inet import IPProto
from xfgate.verdict.blocksets import (
    BlockEntry,
    blocked_entries,
    parse_member,
    port_entries,
    set_contents,
    set_type,
    socket_entries,
)
from xfgate.verdict.policy import compile_policy

A4, A6 = ip_address("0.0.0.0"), ip_address("::")
G4, C4 = ip_address("198.18.9.2"), ip_address("198.18.9.1")
G6, C6 = ip_address("2001:2:0:9::2"), ip_address("2001:2:0:9::1")
SPRAY = Owner(300, 1001, 1001, "spray")
WEB = Owner(200, 1000, 1000, "httpd")
TCP, UDP = IPProto.TCP, IPProto.UDP


def sock(
    local: str | object,
    lport: int,
    remote: str | object = A4,
    rport: int = 0,
    *,
    state: str = "LISTEN",
    owners: tuple[Owner, ...] = (SPRAY,),
    proto: int = TCP,
    v6only: bool = False,
) -> GuestSocket:
    return GuestSocket(
        proto,
        ip_address(str(local)),
        lport,
        ip_address(str(remote)),
        rport,
        state,
        1001,
        owners,
        v6only=v6only,
    )


def texts(s: GuestSocket) -> list[str]:
    return [str(e) for e in socket_entries(s)]


def test_a_v6only_wildcard_listener_blocks_ipv6_only() -> None:
    assert texts(sock("::", 8080, "::", v6only=True)) == ["::/1,tcp:8080", "8000::/1,tcp:8080"]
    # Without IPV6_V6ONLY a [::] socket takes IPv4 too.
    both = texts(sock("::", 8080, "::"))
    assert both == [
        "::/1,tcp:8080",
        "8000::/1,tcp:8080",
        "0.0.0.0/1,tcp:8080",
        "128.0.0.0/1,tcp:8080",
    ]


def test_an_address_bound_socket_blocks_that_address_only() -> None:
    assert texts(sock(G4, 53, proto=UDP, state="CLOSE")) == ["198.18.9.2,udp:53"]
    assert texts(sock(G6, 53, "::", proto=UDP)) == ["2001:2:0:9::2,udp:53"]
    assert texts(sock("::ffff:198.18.9.2", 80, "::")) == ["198.18.9.2,tcp:80"]


def test_a_connected_socket_blocks_its_flow_only() -> None:
    assert texts(sock(G4, 40000, C4, 2222, state="ESTABLISHED")) == [
        "198.18.9.2,tcp:40000,198.18.9.1"
    ]
    mapped = sock("::ffff:198.18.9.2", 40001, "::ffff:198.18.9.1", 80, state="ESTABLISHED")
    assert texts(mapped) == ["198.18.9.2,tcp:40001,198.18.9.1"]
    lite = sock(G6, 41000, C6, 9, state="ESTABLISHED", proto=IPProto.UDPLITE)
    assert texts(lite) == ["2001:2:0:9::2,udplite:41000,2001:2:0:9::1"]


def test_no_entries_without_ports() -> None:
    assert texts(sock(G4, 0)) == [] and texts(sock(G4, 7, proto=IPProto.ICMP)) == []
    assert port_entries(IPProto.ICMP, 1) == [] and len(port_entries(TCP, 23)) == 4


def test_blocked_entries_follow_the_policy() -> None:
    sockets = [
        sock(G4, 40000, C4, 2222, state="ESTABLISHED"),
        sock("::", 8080, "::", v6only=True, owners=(WEB,)),
        sock(G4, 40002, C4, 2222, state="TIME_WAIT", owners=()),
        sock(G4, 40003, C4, 2222, state="SYN_SENT", owners=()),  # holders hidden: sk_uid 1001
    ]
    got = {str(e) for e in blocked_entries(sockets, compile_policy(uids=[1001]))}
    assert got == {"198.18.9.2,tcp:40000,198.18.9.1", "198.18.9.2,tcp:40003,198.18.9.1"}
    ports = blocked_entries([], compile_policy(ports=["udp/5353"]))
    assert {e.family for e in ports} == {4, 6} and all(e.port == 5353 for e in ports)


def test_set_contents_and_types() -> None:
    entries = socket_entries(sock("::", 80, "::")) + socket_entries(
        sock(G4, 1, C4, 2, state="ESTABLISHED")
    )
    contents = set_contents(9, entries)
    assert sorted(contents) == [
        "xfgate-9-flow4",
        "xfgate-9-flow6",
        "xfgate-9-port4",
        "xfgate-9-port6",
    ]
    assert len(contents["xfgate-9-port4"]) == 2 and contents["xfgate-9-flow6"] == []
    assert set_type("xfgate-9-flow6-new").stype == "hash:ip,port,ip"
    assert set_type("xfgate-9-flow6-new").family == 10
    assert set_type("xfgate-9-port4").family == 2


def test_member_text_round_trips() -> None:
    for e in [
        BlockEntry(4, TCP, 80, "0.0.0.0/1"),
        BlockEntry(6, UDP, 53, "2001:2:0:9::2"),
        BlockEntry(4, TCP, 40000, "198.18.9.2", "198.18.9.1"),
    ]:
        assert parse_member(str(e), e.family) == e
