"""What the verdict engine and the introspection agree on: a flow seen from the guest's side,
and who owns it inside the guest.

A flow is always stated from the guest's point of view: ``local`` is the guest's address/port,
``remote`` the peer's, whichever direction the packet travels. That is also how the guest kernel
keys its sockets (``skc_rcv_saddr``/``skc_num`` local, ``skc_daddr``/``skc_dport`` remote).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from xfgate.inet import proto_label

IPAddress = IPv4Address | IPv6Address
# Harness compatibility (xfgate/lab/truth.py reads it): the names of TCPState, by number.


class Via(enum.StrEnum):
    """How the socket of an answer was found (``Ownership.via``, the verdict log's ``via``)."""

    ESTABLISHED = "established"  # tcp_hashinfo.ehash: a full socket of the flow
    TIME_WAIT = "time-wait"  # ehash: an inet_timewait_sock (no task holds it)
    LISTENER = "listener"  # lhash2: the listening socket of the flow's local end
    UDP = "udp"  # udp_table
    # The SYN-ACK of an incoming connection: a request sock no task holds yet, attributed to
    # the listener that created it.
    REQUEST_SOCK_LISTENER = "request-sock->listener"
    # An accepted connection no task holds yet (still in the accept queue): the listener's.
    ESTABLISHED_LISTENER = "established->listener"
    # A SYN meeting a TIME_WAIT sock: the kernel hands it to the listener (TCP_TW_SYN).
    TIME_WAIT_LISTENER = "time-wait->listener"
    WALK = "walk"  # matched against a full walk's sockets (no hash-table layouts)
    UDPLITE = "udplite"  # udplite_table (IP protocol 136)
    PING = "ping"  # ping_table: an ICMP/ICMPv6 echo socket, keyed by the echo identifier
    RAW = "raw"  # raw_v4/v6_hashinfo: a raw socket of the packet's IP protocol
    # A TCP subflow of an MPTCP connection: attributed to the MPTCP socket the process holds
    # (inet_connection_sock.icsk_ulp_data -> mptcp_subflow_context.conn).
    MPTCP_SUBFLOW = "mptcp-subflow->msk"
    # A protocol whose tables we do not read (SCTP, ...): the last walk's (proto, port) index.
    PORT_INDEX = "port-index"
    STATIC = "static"  # a static owner table, not a guest


class Direction(enum.Enum):
    FROM_GUEST = "out"  # entered the host from the guest's vif (physdev-in)
    TO_GUEST = "in"  # leaves the host into the guest's vif (physdev-out)


@dataclass(frozen=True, slots=True)
class Flow:
    proto: int  # IPProto.TCP or IPProto.UDP
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int
    # The hash, computed once: a first packet's flow is hashed ~8 times on the way through the
    # cache, and an ipaddress hash is hash(hex(int)) each time (14 % of a decision's time).
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = (self.proto, self.local, self.lport, self.remote, self.rport)
        object.__setattr__(self, "_hash", hash(key))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Flow], tuple[int, IPAddress, int, IPAddress, int]]:
        # Rebuilt (hash recomputed), never restored: str hashes differ between processes.
        return Flow, (self.proto, self.local, self.lport, self.remote, self.rport)

    @property
    def family(self) -> int:
        return self.local.version

    def __str__(self) -> str:
        local, remote = _hostport(self.local, self.lport), _hostport(self.remote, self.rport)
        return f"{proto_label(self.proto)} {local} -> {remote}"


def _hostport(addr: IPAddress, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


@dataclass(frozen=True, slots=True)
class Owner:
    """A guest task holding the socket in its file table (one per thread group and fd)."""

    pid: int  # thread-group leader's pid as userspace sees it (task_struct.tgid)
    uid: int  # real uid (cred.uid)
    euid: int
    comm: str
    fd: int = -1
    # The task's executable (mm->exe_file's path), "" for kernel threads or when unreadable.
    exe: str = ""
    # Thread-group ids up the real_parent chain, nearest first (bounded): a --block-pid covers
    # the blocked process's descendants.
    ancestors: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Ownership:
    """The answer of a targeted lookup: the guest socket carrying a flow and its owners.

    ``via`` says how the socket was found, a ``Via`` value (the SYN-ACK of an incoming
    connection belongs to a request socket no process holds yet: it is attributed to the
    listening socket's owners, ``Via.REQUEST_SOCK_LISTENER``).
    ``owners`` is empty when the socket is held by no task (TIME_WAIT, orphaned, kernel).
    """

    owners: tuple[Owner, ...]
    sk_uid: int
    state: str
    via: Via
    sock_addr: int = 0
    # False when the owners could not be established in time (the socket is newer than the
    # last walk, or that walk was incomplete): empty `owners` then means "unknown", not "none";
    # sk_uid still names the socket's creator.
    holders_known: bool = True


@dataclass(frozen=True, slots=True)
class GuestSocket:
    """One inet socket inside the guest, with every (task, fd) that holds it."""

    proto: int
    local: IPAddress
    lport: int
    remote: IPAddress
    rport: int
    state: str  # kernel tcp_states name: "ESTABLISHED", "LISTEN", "CLOSE" (unconnected UDP), ...
    sk_uid: int
    owners: tuple[Owner, ...]
    sock_addr: int = 0
    v6only: bool = False  # an IPv6 socket that does not also take IPv4 (sk_ipv6only)


@dataclass(frozen=True, slots=True)
class ViewDelta:
    """What a view changed since the view numbered `base` (its `serial`) of the same source:
    the GuestSocket objects it added and those it no longer holds (every other socket is the
    same object in both). Lets a consumer that kept the base view's sockets follow at the cost
    of the change, not of the guest's size; without it (or from another base), compare
    whole views."""

    base: int
    added: tuple[GuestSocket, ...]
    removed: tuple[GuestSocket, ...]


@dataclass(frozen=True, slots=True)
class GuestView:
    """One full walk of the guest: what the kernel-side sets and the policy's process rules
    are computed from. ``complete`` is False when the walk hit a bound or unreadable memory:
    such a view may add to what is blocked, never take away (see verdict/runner)."""

    sockets: tuple[GuestSocket, ...]
    tasks: tuple[Owner, ...]  # every thread group (fd -1), with exe and ancestors
    # Holders of raw IP (SOCK_RAW) and AF_PACKET sockets: they can forge any packet, so a packet
    # no socket sends may be theirs.
    raw_holders: tuple[Owner, ...]
    complete: bool
    problems: tuple[str, ...] = ()
    # A source that numbers its views (1, 2, ...; 0: not numbered) and, for a view it built
    # from its last one, says what changed (ViewDelta.base: that view's serial). Neither takes
    # part in equality: two views of the same guest compare equal whatever their history.
    serial: int = field(default=0, compare=False)
    delta: ViewDelta | None = field(default=None, compare=False)


class OwnerSource(Protocol):
    """What the verdict engine needs from introspection (implemented by xfgate.vmi)."""

    def lookup(self, flow: Flow) -> Ownership | None:
        """The socket carrying `flow` and its owners; None if the guest has no such socket."""
        ...

    def sockets(self) -> Sequence[GuestSocket]:
        """Every inet socket of the guest (a full walk)."""
        ...

    def generation(self) -> int:
        """Changes whenever cached answers become invalid (guest reboot: new KASLR shift)."""
        ...

    def view(self) -> GuestView:
        """One full walk: sockets, every thread group, raw/packet socket holders, and whether
        the walk was complete (an incomplete view may add to what is blocked, never remove)."""
        ...
