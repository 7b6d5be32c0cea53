"""The kernel's netfilter objects through netlink (pyroute2): ipsets, conntrack, nftables.

Each call opens its own netlink socket in the current network namespace and closes it: the
gate's refresher thread and its main thread never share one (pyroute2's sockets carry an
event loop each), and nothing is kept between calls. Kernel refusals become ``FirewallError``.
The exception is ``SetAdapter.link``: one long-lived raw socket for the grant keeper's frequent
small renewals (``ipset_wire``), each round one send.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from xfgate.errors import FirewallError, PrerequisiteError
from xfgate.verdict.ipset_wire import IpsetLink, LinkStats, SetChange

NFPROTO_UNSPEC = 0  # a set of this family serves IPv4 and IPv6 rules alike
ENOENT = 2
T = TypeVar("T")


@dataclass(frozen=True)
class SetType:
    """How a set is created: its kernel type name, family and type-specific range."""

    stype: str  # "bitmap:port", "hash:ip", ... as ipset(8) names them
    family: int = NFPROTO_UNSPEC
    etype: str = "port"  # the entry kind pyroute2 encodes: "port", "ip", "net,port", ...
    port_range: tuple[int, int] | None = None  # bitmap:port only (inclusive)
    # Seconds an entry lives unless added again (ipset's ``timeout``); None: for ever.
    timeout: int | None = None


BITMAP_PORT = SetType("bitmap:port", NFPROTO_UNSPEC, "port", (0, 65535))
# An entry: a port (bitmap:port), or a tuple of addresses and (port, IP protocol) pairs in the
# order of the set type's etype ("net,port": ("10.0.0.0/8", (80, 6))).
SetEntry = int | tuple[Any, ...]


class SetOps(Protocol):
    """The set operations the gate needs."""

    def create(self, name: str, kind: SetType) -> None:
        """Create ``name`` unless it exists (an existing set is left as it is)."""
        ...

    def add(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None: ...
    def delete(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None: ...
    def members(self, name: str, kind: SetType) -> list[int]:
        """The entries of ``name``; an absent set has none."""
        ...

    def member_texts(self, name: str, kind: SetType) -> list[str]:
        """The entries of a hash set as the `ipset` program prints them, sorted."""
        ...

    def flush(self, name: str) -> None: ...
    def swap(self, name_a: str, name_b: str) -> None: ...
    def destroy(self, name: str) -> None:
        """Destroy ``name``; an absent set is not an error."""
        ...

    def names(self) -> list[str]: ...


class SetLink(Protocol):
    """A connection kept open for frequent small changes of ``hash:net,port`` sets: each
    ``apply`` goes to the kernel in one send (``ipset_wire.IpsetLink``)."""

    stats: LinkStats

    def apply(self, changes: Sequence[SetChange]) -> None: ...
    def close(self) -> None: ...


class SetAdapter(SetOps, Protocol):
    """`SetOps` one call at a time, or several over one connection (``session``), or a
    long-lived ``link`` for frequent renewals. `PyrouteSets` talks to the kernel; tests fake it."""

    def session(self) -> AbstractContextManager[SetOps]: ...
    def link(self) -> SetLink: ...


def _load_pyroute2() -> Any:
    try:
        import pyroute2
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise PrerequisiteError(f"pyroute2 is not installed: {e}") from e
    return pyroute2


def _netlink_code(error: BaseException) -> int:
    code = getattr(error, "code", None)
    return code if isinstance(code, int) else 0


class IpsetSession:
    """`SetOps` over one open pyroute2 ``IPSet`` socket (nfnetlink IPSET subsystem)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def _do(self, what: str, fn: Callable[[Any], T], missing_ok: bool = False) -> T | None:
        try:
            return fn(self._sock)
        except Exception as e:  # pyroute2 raises NetlinkError/IPSetError subclasses
            if missing_ok and _netlink_code(e) == ENOENT:
                return None
            raise FirewallError(f"ipset {what} failed: {e}") from e

    def create(self, name: str, kind: SetType) -> None:
        def do(sock: Any) -> None:
            sock.create(
                name,
                stype=kind.stype,
                family=kind.family,
                exclusive=False,
                bitmap_ports_range=kind.port_range,
                timeout=kind.timeout,
            )

        self._do(f"create {name} {kind.stype}", do)

    def add(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None:
        """Add (or, in a set with timeouts, renew) ``entries``."""

        def do(sock: Any) -> None:
            for entry in entries:
                sock.add(name, _encode(entry), etype=kind.etype, exclusive=False, **_fam(kind))

        self._do(f"add to {name}", do)

    def delete(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None:
        def do(sock: Any) -> None:
            for entry in entries:
                sock.delete(name, _encode(entry), etype=kind.etype, exclusive=False, **_fam(kind))

        self._do(f"delete from {name}", do)

    def members(self, name: str, kind: SetType) -> list[int]:
        if kind.etype != "port":
            raise FirewallError(f"listing {kind.etype} entries is not implemented (set {name})")

        def do(sock: Any) -> list[int]:
            out: list[int] = []
            for msg in sock.list(name):
                adt = msg.get_attr("IPSET_ATTR_ADT")
                if adt is None:
                    continue
                for data in adt.get_attrs("IPSET_ATTR_DATA"):
                    # IPSET_ATTR_PORT and IPSET_ATTR_PORT_FROM share attribute number 4;
                    # pyroute2 decodes it under the second name.
                    port = data.get_attr("IPSET_ATTR_PORT_FROM")
                    if port is None:
                        port = data.get_attr("IPSET_ATTR_PORT")
                    if port is not None:
                        out.append(int(port))
            return sorted(out)

        return self._do(f"list {name}", do, missing_ok=True) or []

    def member_texts(self, name: str, kind: SetType) -> list[str]:
        def do(sock: Any) -> list[str]:
            out: list[str] = []
            for msg in sock.list(name):
                adt = msg.get_attr("IPSET_ATTR_ADT")
                if adt is None:
                    continue
                out += [_member_text(data, kind) for data in adt.get_attrs("IPSET_ATTR_DATA")]
            return sorted(out)

        return self._do(f"list {name}", do, missing_ok=True) or []

    def flush(self, name: str) -> None:
        self._do(f"flush {name}", lambda sock: sock.flush(name))

    def swap(self, name_a: str, name_b: str) -> None:
        self._do(f"swap {name_a} {name_b}", lambda sock: sock.swap(name_a, name_b))

    def destroy(self, name: str) -> None:
        self._do(f"destroy {name}", lambda sock: sock.destroy(name), missing_ok=True)

    def names(self) -> list[str]:
        def do(sock: Any) -> list[str]:
            found = (msg.get_attr("IPSET_ATTR_SETNAME") for msg in sock.list())
            return sorted({str(n) for n in found if n})

        return self._do("list", do) or []


def _fam(kind: SetType) -> dict[str, int]:
    """pyroute2 encodes addresses by the ``family`` argument (AF_INET unless told)."""
    return {} if kind.family == NFPROTO_UNSPEC else {"family": kind.family}


def _encode(entry: SetEntry) -> Any:
    """(port, proto) pairs become pyroute2's PortEntry."""
    if isinstance(entry, int):
        return entry
    from pyroute2.ipset import PortEntry

    return tuple(PortEntry(*e) if isinstance(e, tuple) else e for e in entry)


def _member_text(data: Any, kind: SetType) -> str:
    """One IPSET_ATTR_DATA of a hash set, as `ipset list` prints it (``a/n,tcp:80``)."""
    from xfgate.inet import proto_label

    version = "IPSET_ATTR_IPADDR_IPV6" if kind.family == 10 else "IPSET_ATTR_IPADDR_IPV4"
    parts: list[str] = []
    ips = [data.get_attr("IPSET_ATTR_IP_FROM"), data.get_attr("IPSET_ATTR_IP2")]
    first = ips[0].get_attr(version) if ips[0] is not None else "?"
    cidr = data.get_attr("IPSET_ATTR_CIDR")
    host = 128 if kind.family == 10 else 32
    parts.append(f"{first}/{cidr}" if kind.etype.startswith("net") and cidr != host else first)
    port = data.get_attr("IPSET_ATTR_PORT_FROM")
    if port is None:
        port = data.get_attr("IPSET_ATTR_PORT")
    proto = data.get_attr("IPSET_ATTR_PROTO")
    parts.append(f"{proto_label(int(proto or 0))}:{port}")
    if ips[1] is not None:
        parts.append(str(ips[1].get_attr(version)))
    return ",".join(parts)


class PyrouteSets:
    """ipsets through pyroute2's IPSet: each call, or each ``session``, opens its own socket;
    a ``link`` keeps one raw nfnetlink socket (no pyroute2) until it is closed."""

    def link(self) -> SetLink:
        return IpsetLink()

    @contextmanager
    def session(self) -> Iterator[IpsetSession]:
        pyroute2 = _load_pyroute2()
        try:
            sock = pyroute2.IPSet()  # asks the kernel's protocol version: fails without ip_set
        except Exception as e:
            raise FirewallError(f"cannot open the ipset netlink socket: {e}") from e
        try:
            yield IpsetSession(sock)
        finally:
            sock.close()

    def create(self, name: str, kind: SetType) -> None:
        with self.session() as s:
            s.create(name, kind)

    def add(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None:
        with self.session() as s:
            s.add(name, kind, entries)

    def delete(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None:
        with self.session() as s:
            s.delete(name, kind, entries)

    def members(self, name: str, kind: SetType) -> list[int]:
        with self.session() as s:
            return s.members(name, kind)

    def member_texts(self, name: str, kind: SetType) -> list[str]:
        with self.session() as s:
            return s.member_texts(name, kind)

    def flush(self, name: str) -> None:
        with self.session() as s:
            s.flush(name)

    def swap(self, name_a: str, name_b: str) -> None:
        with self.session() as s:
            s.swap(name_a, name_b)

    def destroy(self, name: str) -> None:
        with self.session() as s:
            s.destroy(name)

    def names(self) -> list[str]:
        with self.session() as s:
            return s.names()

    def check(self) -> None:
        """Raise PrerequisiteError when the kernel's ipset subsystem does not answer."""
        try:
            with self.session():
                pass
        except FirewallError as e:
            raise PrerequisiteError(f"{e}: load the kernel module with `modprobe ip_set`") from e


def delete_conntrack_marked(mark: int, mask: int) -> None:
    """Delete the conntrack entries whose mark & ``mask`` == ``mark`` (IPv4 and IPv6): one
    filtered flush per family, done by the kernel (ctnetlink). Nothing matching is not an error."""
    pyroute2 = _load_pyroute2()
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            ct = pyroute2.NFCTSocket(nfgen_family=family)
        except OSError as e:
            raise FirewallError(f"cannot open the conntrack netlink socket: {e}") from e
        try:
            ct.flush(mark=mark, mark_mask=mask)
        except Exception as e:
            if _netlink_code(e) != ENOENT:
                raise FirewallError(f"conntrack delete of mark {mark:#x}/{mask:#x}: {e}") from e
        finally:
            ct.close()


def check_conntrack() -> None:
    """Raise PrerequisiteError when ctnetlink does not answer (nf_conntrack_netlink)."""
    pyroute2 = _load_pyroute2()
    try:
        ct = pyroute2.NFCTSocket()
        try:
            ct.stat()
        finally:
            ct.close()
    except Exception as e:
        raise PrerequisiteError(
            f"conntrack netlink does not answer ({e}): `modprobe nf_conntrack_netlink`"
        ) from e


def nft_tables() -> list[str]:
    """``family name`` of every nftables table in this network namespace ([] when nf_tables
    is not loaded: then there are none)."""
    from pyroute2.nftables.main import NFTables

    families = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
    try:
        nft = NFTables(nfgen_family=NFPROTO_UNSPEC)
    except OSError:
        return []
    try:
        tables = list(nft.get_tables())
    except Exception:
        return []  # no nf_tables in this kernel
    finally:
        nft.close()
    return [
        f"{families.get(int(t['nfgen_family']), str(t['nfgen_family']))}"
        f" {t.get_attr('NFTA_TABLE_NAME')}"
        for t in tables
    ]
