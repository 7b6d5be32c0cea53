"""The Internet vocabulary, defined once: IP protocol numbers, TCP flags, address families.

Numbers are the wire's (IANA protocol numbers, TCP header flag bits) and Linux's (address
families, include/linux/socket.h). Names go both ways: ``IPProto.TCP.label == "tcp"`` and
``IPProto.from_label("tcp") is IPProto.TCP``; ``proto_label(n)`` names any number, known or not.
"""

from __future__ import annotations

import enum


class IPProto(enum.IntEnum):
    """IP protocol numbers (IPv4 protocol field, IPv6 next header) xfgate meets."""

    HOPOPTS = 0  # IPv6 hop-by-hop options
    ICMP = 1
    TCP = 6
    UDP = 17
    ROUTING = 43  # IPv6 routing header
    FRAGMENT = 44  # IPv6 fragment header
    ESP = 50
    AH = 51
    ICMPV6 = 58
    NONE = 59  # IPv6 no next header
    DSTOPTS = 60  # IPv6 destination options
    SCTP = 132
    MH = 135  # IPv6 mobility header
    UDPLITE = 136  # RFC 3828: UDP's header, a partial checksum
    HIP = 139
    SHIM6 = 140
    RAW = 255  # include/uapi/linux/in.h IPPROTO_RAW: a raw socket that sends any protocol

    @property
    def label(self) -> str:
        """The lower-case name that logs, JSON and ``PROTO/PORT`` arguments use."""
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> IPProto:
        """``"tcp"`` to IPProto.TCP; ValueError for a name that is not a protocol."""
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown IP protocol {label!r}") from None


# The transport protocols a guest socket (and so a port block) can have.
PORT_PROTOS: tuple[IPProto, ...] = (IPProto.TCP, IPProto.UDP)


def proto_label(proto: int) -> str:
    """A protocol number's label ("tcp"), or the number itself for one without a name."""
    try:
        return IPProto(proto).label
    except ValueError:
        return str(proto)


class TCPFlag(enum.IntFlag):
    """The flag bits of a TCP header's 13th octet (RFC 9293, RFC 3168)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


class AddressFamily(enum.IntEnum):
    """Linux address families (include/linux/socket.h), as ``sock_common.skc_family`` holds them."""

    INET = 2
    INET6 = 10

    @property
    def ip_version(self) -> int:
        return 4 if self is AddressFamily.INET else 6
