"""ipset additions and deletions as raw nfnetlink messages, over one long-lived socket.

The grant keeper renews a handful of ``hash:net,port`` entries four times a second. Through
pyroute2 each renewal round opened an ``IPSet`` (a netlink socket, an asyncio event loop and a
protocol-version request: ~0.6 ms of CPU) and sent one request per entry (~0.3-0.4 ms each):
~4.5 ms of CPU a round, 1.8 % of a core for 10 entries, two thirds of the gate's CPU at rest.

Here one socket is kept open (``IpsetLink``, reopened after any error) and each round is one
``send``: per set and operation one ``IPSET_CMD_ADD``/``IPSET_CMD_DEL`` message carrying every
entry as an ``IPSET_ATTR_DATA`` inside one ``IPSET_ATTR_ADT`` — the batch ``ipset restore``
sends (kernel ``net/netfilter/ipset/ip_set_core.c`` ``ip_set_ad``: an ``IPSET_ATTR_ADT`` needs
``IPSET_ATTR_LINENO`` beside it; entries are applied in order, the first refusal ends the
message). Without ``NLM_F_EXCL`` the kernel sets ``IPSET_FLAG_EXIST``: adding an existing entry
restarts its timeout (the renewal), deleting an absent one is no error.

Attribute numbers and flags are those of ``include/uapi/linux/netfilter/ipset/ip_set.h`` (stable
since ipset protocol 6, Linux 2.6.39); the protocol version sent is the one the kernel announces
on ``IPSET_CMD_PROTOCOL`` (7 since Linux 5.3 accepts >= 6; older kernels want exactly 6).
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_address, ip_network

from xfgate.errors import FirewallError

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_IPSET = 6
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

IPSET_CMD_PROTOCOL = 1
IPSET_CMD_ADD = 9
IPSET_CMD_DEL = 10
# command-level attributes
IPSET_ATTR_PROTOCOL = 1
IPSET_ATTR_SETNAME = 2
IPSET_ATTR_DATA = 7
IPSET_ATTR_ADT = 8
IPSET_ATTR_LINENO = 9
# CADT (entry) attributes
IPSET_ATTR_IP = 1
IPSET_ATTR_CIDR = 3
IPSET_ATTR_PORT = 4
IPSET_ATTR_PROTO = 7
IPSET_ATTR_IP2 = 20  # IPSET_ATTR_CADT_MAX (16) + 4: ETHER, NAME, NAMEREF, IP2
# inside IPSET_ATTR_IP
IPSET_ATTR_IPADDR_IPV4 = 1
IPSET_ATTR_IPADDR_IPV6 = 2

IPSET_PROTOCOL_MIN = 6
IPSET_MAXNAMELEN = 32
NFNETLINK_V0 = 0
RECV_TIMEOUT = 1.0  # seconds all of a call's replies may take before the link is given up
# Entries one message may carry (a keeper round has a handful; a refusal's echo of the
# request must fit in one receive buffer: ~44 bytes an entry).
MAX_ENTRIES = 1024
RECV_BUFFER = 1 << 18

COMMANDS = {"add": IPSET_CMD_ADD, "del": IPSET_CMD_DEL}
_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


def nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


# An entry as the set adapters take it (``nfnetlink.SetEntry``); only (net, (port, proto)) here.
WireEntry = int | tuple[object, ...]


def netport_data(entry: WireEntry) -> bytes:
    """One ``hash:net,port`` entry, ``("198.18.1.1" | "0.0.0.0/1", (port, proto))``, as the
    IPSET_ATTR_DATA nest the kernel's ``hash_netport{4,6}_uadt`` parses."""
    if not isinstance(entry, tuple) or len(entry) != 2:
        raise ValueError(f"not a (net, (port, proto)) entry: {entry!r}")
    net = ip_network(str(entry[0]), strict=True)
    port, proto = _port_proto(entry[1], entry)
    kind = IPSET_ATTR_IPADDR_IPV4 if isinstance(net, IPv4Network) else IPSET_ATTR_IPADDR_IPV6
    address = nla(kind | NLA_F_NET_BYTEORDER, net.network_address.packed)
    return nla(
        IPSET_ATTR_DATA | NLA_F_NESTED,
        nla(IPSET_ATTR_IP | NLA_F_NESTED, address)
        + nla(IPSET_ATTR_CIDR, bytes([net.prefixlen]))
        + nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", port))
        + nla(IPSET_ATTR_PROTO, bytes([proto])),
    )


def ipportip_data(entry: WireEntry) -> bytes:
    """One ``hash:ip,port,ip`` entry, ``("198.18.1.1", (port, proto), "198.18.0.1")``, as
    the IPSET_ATTR_DATA nest ``hash_ipportip{4,6}_uadt`` parses (IPSET_ATTR_IP2 = 20)."""
    if not isinstance(entry, tuple) or len(entry) != 3:
        raise ValueError(f"not an (ip, (port, proto), ip) entry: {entry!r}")
    local, remote = ip_address(str(entry[0])), ip_address(str(entry[2]))
    if local.version != remote.version:
        raise ValueError(f"addresses of two families: {entry!r}")
    port, proto = _port_proto(entry[1], entry)
    kind = IPSET_ATTR_IPADDR_IPV4 if local.version == 4 else IPSET_ATTR_IPADDR_IPV6
    return nla(
        IPSET_ATTR_DATA | NLA_F_NESTED,
        nla(IPSET_ATTR_IP | NLA_F_NESTED, nla(kind | NLA_F_NET_BYTEORDER, local.packed))
        + nla(IPSET_ATTR_PORT | NLA_F_NET_BYTEORDER, struct.pack("!H", port))
        + nla(IPSET_ATTR_PROTO, bytes([proto]))
        + nla(IPSET_ATTR_IP2 | NLA_F_NESTED, nla(kind | NLA_F_NET_BYTEORDER, remote.packed)),
    )


def entry_data(entry: WireEntry) -> bytes:
    """A ``net,port`` (2-tuple) or ``ip,port,ip`` (3-tuple) entry's IPSET_ATTR_DATA."""
    if isinstance(entry, tuple) and len(entry) == 3:
        return ipportip_data(entry)
    return netport_data(entry)


def _port_proto(value: object, entry: object) -> tuple[int, int]:
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"not a (port, proto) pair: {entry!r}")
    port, proto = value
    if not isinstance(port, int) or not isinstance(proto, int):
        raise ValueError(f"port and protocol must be numbers: {entry!r}")
    if not (0 <= port < 65536 and 0 <= proto < 256):
        raise ValueError(f"port or protocol out of range: {entry!r}")
    return port, proto


def nfnl_message(cmd: int, seq: int, attrs: bytes, family: int = socket.AF_INET) -> bytes:
    """An nfnetlink request of the ipset subsystem that asks for an acknowledgement."""
    body = _NFGENMSG.pack(family, NFNETLINK_V0, 0) + attrs
    kind = (NFNL_SUBSYS_IPSET << 8) | cmd
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body
    )


def adt_message(cmd: int, name: str, datas: Sequence[bytes], protocol: int, seq: int) -> bytes:
    """``IPSET_CMD_ADD``/``DEL`` of several entries (already encoded ``netport_data``) at once."""
    raw = name.encode()
    if not raw or len(raw) >= IPSET_MAXNAMELEN or b"\0" in raw:
        raise ValueError(f"not an ipset name: {name!r}")
    if not datas or len(datas) > MAX_ENTRIES:
        raise ValueError(f"{len(datas)} entries in one message (1-{MAX_ENTRIES})")
    attrs = (
        nla(IPSET_ATTR_PROTOCOL, bytes([protocol]))
        + nla(IPSET_ATTR_SETNAME, raw + b"\0")
        + nla(IPSET_ATTR_LINENO, struct.pack("=I", 0))
        + nla(IPSET_ATTR_ADT | NLA_F_NESTED, b"".join(datas))
    )
    return nfnl_message(cmd, seq, attrs)


def parse_attrs(data: bytes) -> dict[int, bytes]:
    """The attributes of a netlink payload by type (flags masked off); bounded by its length."""
    out: dict[int, bytes] = {}
    at = 0
    while at + _NLA.size <= len(data):
        size, kind = _NLA.unpack_from(data, at)
        if size < _NLA.size or at + size > len(data):
            break
        out[kind & NLA_TYPE_MASK] = data[at + _NLA.size : at + size]
        at += (size + 3) & ~3
    return out


def split_messages(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, seq, payload) of each netlink message in a datagram; a torn one ends the list."""
    out: list[tuple[int, int, bytes]] = []
    at = 0
    while at + _NLMSGHDR.size <= len(data):
        size, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, at)
        if size < _NLMSGHDR.size or at + size > len(data):
            break
        out.append((kind, seq, data[at + _NLMSGHDR.size : at + size]))
        at += (size + 3) & ~3
    return out


@dataclass(frozen=True, slots=True)
class SetChange:
    """Add (or renew) or delete ``entries`` of the set ``name`` (``hash:net,port`` entries
    are 2-tuples, ``hash:ip,port,ip`` ones 3-tuples)."""

    op: str  # "add" | "del"
    name: str
    entries: tuple[WireEntry, ...]


@dataclass
class LinkStats:
    """What a link did: calls (``apply``), sends (system calls), netlink requests (messages,
    one per set and operation), entries carried, sockets opened, errors."""

    calls: int = 0
    sends: int = 0
    requests: int = 0
    entries: int = 0
    opens: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "sends": self.sends,
            "requests": self.requests,
            "entries": self.entries,
            "opens": self.opens,
            "errors": self.errors,
        }


ENCODED_MAX = 4096  # entries whose encoding an IpsetLink keeps


class IpsetLink:
    """One nfnetlink socket of the network namespace the opening thread is in, kept between
    calls; every ``apply`` is one send of all its changes, then their acknowledgements. Any
    error (a refusal, a timeout, a torn reply) closes the socket: the next call opens a new
    one, so no stale reply is ever read as another call's. Calls are serialized by a lock."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._protocol = IPSET_PROTOCOL_MIN
        self._seq = 0
        self._lock = threading.Lock()
        self.stats = LinkStats()
        # Each entry's IPSET_ATTR_DATA by the entry: the keeper sends the same few entries
        # four times a second, and encoding one (an address parsed, five attributes packed)
        # was 15 us of the keeper's round (7 entries: 106 us of Python per send, now ~20).
        self._encoded: dict[WireEntry, bytes] = {}

    def _next_seq(self) -> int:
        self._seq = (self._seq % 0x7FFFFFFF) + 1
        return self._seq

    def _open(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            sock.settimeout(RECV_TIMEOUT)
            sock.bind((0, 0))
            self.stats.opens += 1
            seq = self._next_seq()
            ask = nfnl_message(
                IPSET_CMD_PROTOCOL, seq, nla(IPSET_ATTR_PROTOCOL, bytes([IPSET_PROTOCOL_MIN]))
            )
            sock.send(ask)
            replies = self._acks(sock, {seq})
            attrs = parse_attrs(replies.get(seq, b"")[_NFGENMSG.size :])
            announced = attrs.get(IPSET_ATTR_PROTOCOL, b"")
            self._protocol = announced[0] if announced else IPSET_PROTOCOL_MIN
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _acks(self, sock: socket.socket, pending: set[int]) -> dict[int, bytes]:
        """Read until every sequence number in ``pending`` is acknowledged; the payloads of
        the replies other than acks by seq. A refusal raises FirewallError (after all acks
        are read); bounded: RECV_TIMEOUT for all of them, at most 64 datagrams."""
        replies: dict[int, bytes] = {}
        refused: list[str] = []
        deadline = time.monotonic() + RECV_TIMEOUT
        for _ in range(64):
            if not pending:
                break
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            for kind, seq, payload in split_messages(sock.recv(RECV_BUFFER)):
                if kind in (NLMSG_ERROR, NLMSG_DONE):
                    code = struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else -1
                    pending.discard(seq)
                    if code:
                        refused.append(f"seq {seq}: error {-code}")
                elif seq in pending:
                    replies[seq] = payload
        if pending:
            raise FirewallError(f"ipset: no acknowledgement for {len(pending)} request(s)")
        if refused:
            raise FirewallError("ipset refused: " + ", ".join(refused))
        return replies

    def apply(self, changes: Sequence[SetChange]) -> None:
        """Send every change (empty ones skipped) in one datagram and wait for their acks."""
        with self._lock:
            self.stats.calls += 1
            todo = [c for c in changes if c.entries]
            if not todo:
                return
            try:
                sock = self._open()
                messages: list[bytes] = []
                pending: set[int] = set()
                for c in todo:
                    seq = self._next_seq()
                    datas = [self._data(e) for e in c.entries]
                    messages.append(adt_message(COMMANDS[c.op], c.name, datas, self._protocol, seq))
                    pending.add(seq)
                sock.send(b"".join(messages))
                self.stats.sends += 1
                self.stats.requests += len(messages)
                self.stats.entries += sum(len(c.entries) for c in todo)
                self._acks(sock, pending)
            except (OSError, ValueError, FirewallError, struct.error) as e:
                self.stats.errors += 1
                self._close()
                raise FirewallError(f"ipset batch failed: {e}") from e

    def _data(self, entry: WireEntry) -> bytes:
        """entry_data(entry), encoded once while at most ENCODED_MAX entries are kept (then
        forgotten all at once: bounded whatever the sets hold)."""
        try:
            data = self._encoded.get(entry)
        except TypeError:  # not hashable: not an entry entry_data takes either
            return entry_data(entry)
        if data is None:
            data = entry_data(entry)
            if len(self._encoded) >= ENCODED_MAX:
                self._encoded.clear()
            self._encoded[entry] = data
        return data

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()
