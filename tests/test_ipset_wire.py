"""The grant keeper's batched ipset renewals (``xfgate/verdict/ipset_wire.py``).

The encoding is read back by an independent decoder (pyroute2's ``ipset_msg``); the firewall's
use of one kept link per domain with a fake. The real kernel (a fresh network namespace, read
back with ``ipset list``) is in tests/test_verdict_nfnetlink.py."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from tests.test_verdict_nfnetlink import FakeSets, ListingBackend
from xfgate.inet import IPProto
from xfgate.verdict import ipset_wire
from xfgate.verdict.blocksets import BlockEntry
from xfgate.verdict.fastpath import Firewall
from xfgate.verdict.ipset_wire import (
    IPSET_CMD_ADD,
    IPSET_CMD_DEL,
    NFNL_SUBSYS_IPSET,
    NLMSG_ERROR,
    IpsetLink,
    SetChange,
    adt_message,
    entry_data,
    netport_data,
    nla,
    parse_attrs,
    split_messages,
)

TCP = int(IPProto.TCP)


def _decoded(raw: bytes) -> Any:
    from pyroute2.netlink.nfnetlink.ipset import ipset_msg

    msg = ipset_msg(raw)
    msg.decode()
    return msg


def _entries(msg: Any, version: str) -> list[tuple[str, int, int, int]]:
    out = []
    for data in msg.get_attr("IPSET_ATTR_ADT").get_attrs("IPSET_ATTR_DATA"):
        address = data.get_attr("IPSET_ATTR_IP_FROM").get_attr(version)
        port = data.get_attr("IPSET_ATTR_PORT_FROM")
        out.append(
            (address, data.get_attr("IPSET_ATTR_CIDR"), port, data.get_attr("IPSET_ATTR_PROTO"))
        )
    return out


def test_a_batch_carries_every_entry_in_one_message_as_ipset_restore_does() -> None:
    datas = [netport_data(("0.0.0.0/1", (80, TCP))), netport_data(("198.18.1.1", (22, TCP)))]
    raw = adt_message(IPSET_CMD_ADD, "xfgate-1-lsn4", datas, 7, 42)
    msg = _decoded(raw)
    assert msg["header"]["type"] == (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_ADD
    assert msg["header"]["sequence_number"] == 42 and msg["header"]["length"] == len(raw)
    assert msg["header"]["flags"] == 0x1 | 0x4  # a request asking for an ack, no NLM_F_EXCL
    assert msg.get_attr("IPSET_ATTR_PROTOCOL") == 7
    assert msg.get_attr("IPSET_ATTR_SETNAME") == "xfgate-1-lsn4"
    assert msg.get_attr("IPSET_ATTR_LINENO") == 0  # the kernel wants it beside an ADT
    assert _entries(msg, "IPSET_ATTR_IPADDR_IPV4") == [
        ("0.0.0.0", 1, 80, TCP),
        ("198.18.1.1", 32, 22, TCP),
    ]


def test_ipv6_entries_and_deletions() -> None:
    datas = [netport_data(("8000::/1", (8080, TCP))), netport_data(("2001:2::1:1", (9000, TCP)))]
    msg = _decoded(adt_message(IPSET_CMD_DEL, "xfgate-1-lsn6", datas, 6, 1))
    assert msg["header"]["type"] == (NFNL_SUBSYS_IPSET << 8) | IPSET_CMD_DEL
    assert _entries(msg, "IPSET_ATTR_IPADDR_IPV6") == [
        ("8000::", 1, 8080, TCP),
        ("2001:2::1:1", 128, 9000, TCP),
    ]


@pytest.mark.parametrize(
    "entry",
    [80, ("0.0.0.0/1",), ("0.0.0.1/1", (80, TCP)), ("0.0.0.0/1", (70000, TCP)), ("x", (80, TCP))],
)
def test_what_is_not_a_net_port_entry_is_refused(entry: Any) -> None:
    with pytest.raises(ValueError):
        netport_data(entry)


def test_names_and_sizes_are_bounded() -> None:
    data = [netport_data(("0.0.0.0/1", (80, TCP)))]
    for name in ("", "x" * 32, "a\0b"):
        with pytest.raises(ValueError):
            adt_message(IPSET_CMD_ADD, name, data, 7, 1)
    with pytest.raises(ValueError):
        adt_message(IPSET_CMD_ADD, "s", [], 7, 1)


def test_replies_are_parsed_within_their_bounds() -> None:
    attrs = nla(1, b"\x07") + nla(2, b"name\0")
    assert parse_attrs(attrs) == {1: b"\x07", 2: b"name\0"}
    assert parse_attrs(attrs + b"\xff\x00\x01") == {1: b"\x07", 2: b"name\0"}  # torn tail
    assert parse_attrs(b"\x02\x00\x01\x00") == {}  # a length below the header's: stop
    ack = adt_message(IPSET_CMD_ADD, "s", [netport_data(("0.0.0.0/1", (80, TCP)))], 7, 9)
    parts = split_messages(ack + ack[:10])
    assert [(kind & 0xFF, seq) for kind, seq, _ in parts] == [(IPSET_CMD_ADD, 9)]


def _entry(port: int, local: str = "0.0.0.0/1", family: int = 4) -> BlockEntry:
    return BlockEntry(family, IPProto.TCP, port, local)


def test_the_firewall_renews_over_one_kept_link_per_domain_in_one_send() -> None:
    sets = FakeSets()
    fw = Firewall(ListingBackend(), sets)
    for name in ("xfgate-1-lsn4", "xfgate-1-lsn6"):
        sets.sets[name] = set()
    a, b, c = _entry(80), _entry(22), _entry(8080, "::/1", 6)
    for _ in range(3):
        fw.set_listeners(1, {a, b, c})
    fw.set_listeners(1, {a}, gone={b, c})
    assert [op for op in sets.ops if op[0] == "link"] == [("link", "", ())]  # opened once
    assert sets.sets["xfgate-1-lsn4"] == {("0.0.0.0/1", (80, TCP))}
    assert sets.sets["xfgate-1-lsn6"] == set()
    stats = fw.listener_link_stats(1)
    # 4 calls, each one send; 2 requests (add v4, add v6) x 3, then del v4 + add v4 + del v6.
    assert stats["sends"] == 4 and stats["requests"] == 9
    last = [op[:2] for op in sets.ops[-3:]]
    assert last == [
        ("delete", "xfgate-1-lsn4"),
        ("add", "xfgate-1-lsn4"),
        ("delete", "xfgate-1-lsn6"),
    ]
    fw.remove(1)
    assert fw.listener_link_stats(1) == {}  # closed with the domain; the next one is new


def test_flow_entries_carry_both_addresses() -> None:
    datas = [entry_data(("198.18.1.1", (40000, TCP), "198.18.0.1"))]
    datas.append(entry_data(("2001:2::1:1", (41000, 136), "2001:2::1")))
    msg = _decoded(adt_message(IPSET_CMD_ADD, "xfgate-1-flow4", datas, 7, 3))
    got = []
    for data in msg.get_attr("IPSET_ATTR_ADT").get_attrs("IPSET_ATTR_DATA"):
        ips = [data.get_attr(a) for a in ("IPSET_ATTR_IP_FROM", "IPSET_ATTR_IP2")]
        version = "IPSET_ATTR_IPADDR_IPV4" if "." in str(ips[0]) else "IPSET_ATTR_IPADDR_IPV6"
        addrs = [
            ip.get_attr("IPSET_ATTR_IPADDR_IPV4") or ip.get_attr("IPSET_ATTR_IPADDR_IPV6")
            for ip in ips
        ]
        got.append(
            (
                addrs[0],
                data.get_attr("IPSET_ATTR_PORT_FROM"),
                data.get_attr("IPSET_ATTR_PROTO"),
                addrs[1],
            )
        )
        assert data.get_attr("IPSET_ATTR_CIDR") is None, version
    assert got == [
        ("198.18.1.1", 40000, TCP, "198.18.0.1"),
        ("2001:2::1:1", 41000, 136, "2001:2::1"),
    ]
    with pytest.raises(ValueError):
        entry_data(("198.18.1.1", (40000, TCP), "2001:2::1"))  # two families


class _AckingSocket:
    """A netlink socket that acknowledges every request it is sent (error 0)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self._acks = b""

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        for _kind, seq, _payload in split_messages(data):
            self._acks += struct.pack("=IHHII", 20, NLMSG_ERROR, 0, seq, 0) + b"\0" * 4
        return len(data)

    def recv(self, size: int) -> bytes:
        out, self._acks = self._acks, b""
        return out

    def settimeout(self, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_link_encodes_each_entry_once_and_sends_the_same_bytes_as_a_fresh_encoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keeper sends the same entries four times a second: each entry's encoding is kept
    (bounded by ENCODED_MAX, then forgotten at once) and every send carries exactly what
    entry_data encodes, the entries a set holds or not."""
    monkeypatch.setattr(ipset_wire, "ENCODED_MAX", 3)
    link = IpsetLink()
    fake = _AckingSocket()
    monkeypatch.setattr(link, "_open", lambda: fake)
    entries = [("198.18.1.1", (p, TCP)) for p in (80, 8080, 8000, 9000)]
    for n in (2, 2, 4, 4):
        link.apply([SetChange("add", "xfgate-1-lsn4", tuple(entries[:n]))])
        [(_kind, seq, _payload)] = split_messages(fake.sent[-1])
        fresh = [entry_data(e) for e in entries[:n]]
        assert fake.sent[-1] == adt_message(IPSET_CMD_ADD, "xfgate-1-lsn4", fresh, 6, seq)
        assert len(link._encoded) <= 3
    assert link.stats.sends == 4 and link.stats.errors == 0
