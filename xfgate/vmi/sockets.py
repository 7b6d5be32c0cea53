"""Targeted socket lookup: from a packet's 5-tuple to the guest's struct sock, without a walk.

The kernel's own hash tables, as in Linux 6.1 and 6.12 (layouts from the profile, members and
symbols tested by name; where the hash secrets live: HASH_SECRETS):
  - tcp_hashinfo.ehash: established, TIME_WAIT and request (TCPState.NEW_SYN_RECV) socks, bucket by
    inet_ehashfn/inet6_ehashfn with the secrets read from guest memory; chained on
    sock_common.skc_nulls_node, ended by a "nulls" marker (odd pointer);
  - tcp_hashinfo.lhash2: listeners by (address, port) (ipv4/ipv6_portaddr_hash), same chaining;
  - udp_table.hash: UDP socks by local port ((port + net_hash_mix) & mask), on skc_node;
    udplite_table the same for UDP-Lite (IP protocol 136);
  - ping_table.hash: ICMP/ICMPv6 echo ("ping") sockets by echo identifier (their skc_num),
    ((id + net_hash_mix) & mask) (net/ipv4/ping.c ping_hashfn), on skc_nulls_node;
  - raw_v4_hashinfo/raw_v6_hashinfo.ht: raw sockets, skc_num = their IP protocol. The bucket
    function changed in v6.0 (commit 0daf07e52709 moved them to hlist_nulls and hashed with
    net_hash_mix; later stable kernels went back to hlist): all buckets are read, one small array;
  - MPTCP: a TCP sock whose inet_connection_sock.icsk_ulp_ops is &subflow_ulp_ops is a subflow;
    icsk_ulp_data -> mptcp_subflow_context.conn is the MPTCP socket the process holds.
Only the initial network namespace (init_net) is searched: that is the one holding the guest's NIC.
Every chain is followed by `walk.walk_list`: bounded in steps and time, cycle-safe, each node's
`pprev` checked against where the walk came from; a broken chain ends the lookup with a structured
reason (`SocketTables.errors`), not an exception.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import NamedTuple, cast

from xfgate.errors import MemoryReadError, ProfileError
from xfgate.flow import Flow, IPAddress
from xfgate.inet import AddressFamily, IPProto
from xfgate.vmi import jhash
from xfgate.vmi.kernel_constants import TCPState
from xfgate.vmi.linux import (
    KERNEL_SPACE_START,
    KERNEL_SPACE_START_LA57,
    InetSock,
    KernelLayout,
    decode_inet_sock,
    is_kernel_pointer,
)
from xfgate.vmi.paging import AddressSpace
from xfgate.vmi.profile import Profile
from xfgate.vmi.walk import Deadline, WalkIssue, WalkReason, walk_hlist

MAX_CHAIN = 4096  # sockets per hash bucket we are willing to look at
LOOKUP_SECONDS = 1.0  # time bound of one lookup (every chain it follows)
LISTENER_KEYS_MAX = 4096  # remembered lhash2 keys (local address, port): a bound, then forgotten
LISTENER_MEMO_MAX = 256  # remembered listener lookups (reads, answer): a bound, then forgotten
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_LINKS = struct.Struct("<QQ")  # hlist_node / hlist_nulls_node: next, pprev


def symbol_names(profile: Profile) -> str:
    """Every symbol name, one a line (with a newline before the first): a prefix search by
    `str.find` at C speed instead of a Python loop over ~94,000 names (0.1 s each)."""
    return "\n" + "\n".join(profile.symbols) + "\n"


def _symbol_prefixed(profile: Profile, name: str, names: str | None = None) -> int | None:
    """A symbol by its exact name, else by the spelling kallsyms gives a function-local static
    (`static u32 inet_ehash_secret` inside inet_ehashfn in 6.1: ``inet_ehash_secret.5``);
    None if the profile has neither. `names`: symbol_names(profile), if the caller has it."""
    if profile.has_symbol(name):
        return profile.symbol(name)
    text = symbol_names(profile) if names is None else names
    at = text.find("\n" + name + ".")
    if at < 0:
        return None
    found = text[at + 1 : text.index("\n", at + 1)]
    return profile.symbols.get(found)


# The hash secrets the lookups need, each: the names it has had (a global or a function-local
# static), then where it moved. The "net: group together hot data" series (Eric Dumazet,
# merged for v6.9; "inet: move inet_ehash_secret and udp_ehash_secret into net_hotdata",
# "ipv6: move inet6_ehash_secret and udp6_ehash_secret into net_hotdata", "ipv6: move
# tcp_ipv6_hash_secret and udp_ipv6_hash_secret to net_hotdata") made them members of
# net_hotdata (include/net/hotdata.h #defines them as net_hotdata.tcp_protocol.secret, ...);
# inet6_ehashfn's `ipv6_hash_secret` was renamed tcp_ipv6_hash_secret there.
HASH_SECRETS: dict[str, tuple[tuple[str, ...], tuple[str, str]]] = {
    "inet_ehash_secret": (("inet_ehash_secret",), ("net_hotdata", "tcp_protocol.secret")),
    "inet6_ehash_secret": (("inet6_ehash_secret",), ("net_hotdata", "tcpv6_protocol.secret")),
    "ipv6_hash_secret": (
        ("ipv6_hash_secret", "tcp_ipv6_hash_secret"),
        ("net_hotdata", "tcpv6_offload.secret"),
    ),
}


def hash_secret(profile: Profile, what: str, symbols: str | None = None) -> int:
    """The link-time address of a hash secret (a HASH_SECRETS key), tested for by symbol and
    member, never by version; ProfileError naming every spelling tried if none is there.
    `symbols`: symbol_names(profile), made once by a caller asking for several."""
    names, (holder, path) = HASH_SECRETS[what]
    for name in names:
        addr = _symbol_prefixed(profile, name, symbols)
        if addr is not None:
            return addr
    if profile.has_symbol(holder):
        try:
            return profile.symbol(holder) + profile.offset(holder, path)
        except ProfileError:
            pass
    tried = ", ".join([*names, f"{holder}.{path}"])
    raise ProfileError(f"profile for {profile.release} has no {what} (tried {tried})", symbol=what)


@dataclass(frozen=True)
class HashLayout:
    """Offsets and symbols of the socket hash tables (6.1 names)."""

    tcp_hashinfo: int
    udp_table: int
    init_net: int
    hash_mix: int  # net.hash_mix
    inet_ehash_secret: int
    inet6_ehash_secret: int
    ipv6_hash_secret: int
    ehash: int
    ehash_mask: int
    lhash2: int
    lhash2_mask: int
    lbucket_size: int
    lbucket_head: int
    udp_hash: int
    udp_mask: int
    hslot_size: int
    hslot_head: int
    skc_nulls_node: int
    skc_node: int
    skc_listener: int
    skc_net: int
    sock_common_size: int
    # Optional tables and members (0 / -1 when the profile lacks them: lookups skip them).
    udplite_table: int = 0
    ping_table: int = 0
    ping_hash: int = -1
    ping_buckets: int = 0
    raw_v4_hashinfo: int = 0
    raw_v6_hashinfo: int = 0
    raw_ht: int = -1
    raw_buckets: int = 0
    subflow_ulp_ops: int = 0
    icsk_ulp_ops: int = -1
    icsk_ulp_data: int = -1
    subflow_conn: int = -1

    @classmethod
    def from_profile(cls, p: Profile) -> HashLayout:
        # 6.0+ chains listeners on hlist_nulls (inet_listen_hashbucket.nulls_head); before
        # that on a plain hlist `head`. Either way the first pointer is the chain head.
        lhead = "nulls_head" if p.has_member("inet_listen_hashbucket", "nulls_head") else "head"
        names = symbol_names(p)
        return cls(
            tcp_hashinfo=p.symbol("tcp_hashinfo"),
            udp_table=p.symbol("udp_table"),
            init_net=p.symbol("init_net"),
            hash_mix=p.offset("net", "hash_mix"),
            inet_ehash_secret=hash_secret(p, "inet_ehash_secret", names),
            inet6_ehash_secret=hash_secret(p, "inet6_ehash_secret", names),
            ipv6_hash_secret=hash_secret(p, "ipv6_hash_secret", names),
            ehash=p.offset("inet_hashinfo", "ehash"),
            ehash_mask=p.offset("inet_hashinfo", "ehash_mask"),
            lhash2=p.offset("inet_hashinfo", "lhash2"),
            lhash2_mask=p.offset("inet_hashinfo", "lhash2_mask"),
            lbucket_size=p.size("inet_listen_hashbucket"),
            lbucket_head=p.offset("inet_listen_hashbucket", lhead),
            udp_hash=p.offset("udp_table", "hash"),
            udp_mask=p.offset("udp_table", "mask"),
            hslot_size=p.size("udp_hslot"),
            hslot_head=p.offset("udp_hslot", "head"),
            skc_nulls_node=p.offset("sock_common", "skc_nulls_node"),
            skc_node=p.offset("sock_common", "skc_node"),
            skc_listener=p.offset("sock_common", "skc_listener"),
            skc_net=p.offset("sock_common", "skc_net"),
            sock_common_size=p.size("sock_common"),
            **_optional_tables(p),
        )


def _optional_tables(p: Profile) -> dict[str, int]:
    """The tables of the other protocols, each only if the profile has all it needs."""
    out: dict[str, int] = {}
    if p.has_symbol("udplite_table"):
        out["udplite_table"] = p.symbol("udplite_table")
    if p.has_symbol("ping_table") and p.has_member("ping_table", "hash"):
        out["ping_table"] = p.symbol("ping_table")
        out["ping_hash"] = p.offset("ping_table", "hash")
        out["ping_buckets"] = p.member("ping_table", "hash").size // 8  # one head pointer each
    if p.has_member("raw_hashinfo", "ht") and p.has_symbol("raw_v4_hashinfo"):
        out["raw_v4_hashinfo"] = p.symbol("raw_v4_hashinfo")
        out["raw_v6_hashinfo"] = (
            p.symbol("raw_v6_hashinfo") if p.has_symbol("raw_v6_hashinfo") else 0
        )
        out["raw_ht"] = p.offset("raw_hashinfo", "ht")
        out["raw_buckets"] = p.member("raw_hashinfo", "ht").size // 8
    mptcp = [("inet_connection_sock", m) for m in ("icsk_ulp_ops", "icsk_ulp_data")]
    if (
        p.has_symbol("subflow_ulp_ops")
        and all(p.has_member(s, m) for s, m in mptcp)
        and p.has_member("mptcp_subflow_context", "conn")
    ):
        out["subflow_ulp_ops"] = p.symbol("subflow_ulp_ops")
        out["icsk_ulp_ops"] = p.offset("inet_connection_sock", "icsk_ulp_ops")
        out["icsk_ulp_data"] = p.offset("inet_connection_sock", "icsk_ulp_data")
        out["subflow_conn"] = p.offset("mptcp_subflow_context", "conn")
    return out


class HashTable(enum.StrEnum):
    """Which kernel hash table (and which kind of entry in it) a sock was found in."""

    ESTABLISHED = "established"  # tcp_hashinfo.ehash, a full socket
    TIME_WAIT = "time-wait"  # ehash, an inet_timewait_sock
    REQUEST = "request"  # ehash, a request_sock (TCP_NEW_SYN_RECV)
    LISTENER = "listener"  # tcp_hashinfo.lhash2
    UDP = "udp"  # udp_table
    UDPLITE = "udplite"  # udplite_table
    PING = "ping"  # ping_table
    RAW = "raw"  # raw_v4_hashinfo / raw_v6_hashinfo


@dataclass(frozen=True, slots=True)
class FoundSock:
    """A struct sock found in a hash table; for HashTable.REQUEST `listener` is rsk_listener."""

    sock: InetSock
    table: HashTable
    listener: int = 0
    msk: int = 0  # an MPTCP subflow (or a request of a subflow listener): its MPTCP sock


@dataclass(frozen=True, slots=True)
class _Secrets:
    hash_mix: int
    ehash: int
    ehash6: int
    ipv6: int


@dataclass(frozen=True, slots=True)
class _Tables:
    """Bucket arrays and masks: allocated once at boot (tcp_init, udp_table_init), fixed after."""

    ehash: int
    ehash_mask: int
    lhash2: int
    lhash2_mask: int
    udp_hash: int
    udp_mask: int
    udplite_hash: int = 0
    udplite_mask: int = 0


class _RecordingSpace:
    """An address space's reads, passed through and noted (address, bytes) in order: what
    a listener lookup's answer was decoded from (SocketTables.find_listener)."""

    def __init__(self, space: AddressSpace) -> None:
        self._space = space
        self.levels = space.levels
        self.reads: list[tuple[int, bytes]] = []

    def read(self, vaddr: int, length: int) -> bytes:
        data = self._space.read(vaddr, length)
        self.reads.append((vaddr, data))
        return data


class SocketTables:
    """Lookups in one guest boot's socket hash tables (make a new one per KASLR generation)."""

    def __init__(
        self, space: AddressSpace, layout: KernelLayout, hashes: HashLayout, virt_shift: int
    ) -> None:
        self.space = space
        self.layout = layout
        self.h = hashes
        self.shift = virt_shift
        self._secrets: _Secrets | None = None
        self._tables: _Tables | None = None
        self.errors: list[WalkIssue] = []  # why the last lookup may have missed
        self._deadline = Deadline.after(LOOKUP_SECONDS)
        # (local address, port, hash_mix) -> the two lhash2 keys (jhash in Python: 20 us).
        self._listener_keys: dict[tuple[bytes, int, int], tuple[int, int]] = {}
        # Address objects by their bytes for decode_inet_sock (at most MAX_INTERNED).
        self._addresses: dict[bytes, IPAddress] = {}
        self._fb_flow: Flow | None = None
        self._fb: FlowBytes | None = None
        # find_listener's last answer per flow with the reads it was decoded from (address,
        # bytes): see _replayed. Counted: `listener_replays` of `listener_lookups`.
        self._listener_memo: dict[Flow, tuple[tuple[tuple[int, bytes], ...], FoundSock | None]] = {}
        self.listener_lookups = 0
        self.listener_replays = 0

    def _flow_bytes(self, flow: Flow) -> FlowBytes:
        """FlowBytes of `flow`, made once per lookup (the ehash and the listener step of one
        TCP lookup share it: the last flow's is kept, by identity)."""
        if flow is not self._fb_flow:
            self._fb_flow, self._fb = flow, FlowBytes.of(flow)
        assert self._fb is not None
        return self._fb

    def _u64(self, vaddr: int) -> int:
        value: int = _U64.unpack(self.space.read(vaddr, 8))[0]
        return value

    def _u32(self, vaddr: int) -> int:
        value: int = _U32.unpack(self.space.read(vaddr, 4))[0]
        return value

    def secrets(self) -> _Secrets:
        """The hash secrets; cached once all are set (net_get_random_once fills them lazily)."""
        if self._secrets is not None:
            return self._secrets
        h, s = self.h, self.shift
        found = _Secrets(
            hash_mix=self._u32(h.init_net + s + h.hash_mix),
            ehash=self._u32(h.inet_ehash_secret + s),
            ehash6=self._u32(h.inet6_ehash_secret + s),
            ipv6=self._u32(h.ipv6_hash_secret + s),
        )
        if found.ehash and found.ehash6 and found.ipv6:
            self._secrets = found
        return found

    def tables(self) -> _Tables:
        """The bucket arrays; cached once all are allocated (read on every lookup before)."""
        if self._tables is not None:
            return self._tables
        h = self.h
        hashinfo = h.tcp_hashinfo + self.shift
        udp = h.udp_table + self.shift
        found = _Tables(
            ehash=self._u64(hashinfo + h.ehash),
            ehash_mask=self._u32(hashinfo + h.ehash_mask),
            lhash2=self._u64(hashinfo + h.lhash2),
            lhash2_mask=self._u32(hashinfo + h.lhash2_mask),
            udp_hash=self._u64(udp + h.udp_hash),
            udp_mask=self._u32(udp + h.udp_mask),
        )
        if h.udplite_table:
            lite = h.udplite_table + self.shift
            found = dataclasses.replace(
                found,
                udplite_hash=self._u64(lite + h.udp_hash),
                udplite_mask=self._u32(lite + h.udp_mask),
            )
        if found.ehash and found.lhash2 and found.udp_hash:
            self._tables = found
        return found

    def find(self, flow: Flow) -> FoundSock | None:
        """The sock the guest kernel would deliver `flow` to; None if there is none."""
        self._start()
        flow = unmap_v4(flow)
        try:
            found = self._by_protocol(flow)
            if found is None:  # a packet no port/echo socket sends: a raw socket's?
                found = self._raw(flow)
            return found
        except MemoryReadError as e:
            self._unreadable(e)
        return None

    def _by_protocol(self, flow: Flow) -> FoundSock | None:
        if flow.proto == IPProto.TCP:
            found = self._established(flow) or self._listener(flow)
            if found is not None and found.table is not HashTable.TIME_WAIT:
                sk = found.listener if found.table is HashTable.REQUEST else found.sock.address
                msk = self.mptcp_msk(sk)
                if msk:
                    found = dataclasses.replace(found, msk=msk)
            return found
        if flow.proto == IPProto.UDP:
            return self._udp(flow)
        if flow.proto == IPProto.UDPLITE:
            return self._udp(flow, lite=True)
        if flow.proto in (IPProto.ICMP, IPProto.ICMPV6):
            return self._ping(flow)
        return None

    def mptcp_msk(self, sk: int) -> int:
        """The MPTCP socket of a TCP subflow (icsk_ulp_ops == &subflow_ulp_ops), else 0."""
        h = self.h
        if not h.subflow_ulp_ops or not is_kernel_pointer(sk, self.space.levels):
            return 0
        if self._u64(sk + h.icsk_ulp_ops) != h.subflow_ulp_ops + self.shift:
            return 0
        ctx = self._u64(sk + h.icsk_ulp_data)
        if not is_kernel_pointer(ctx, self.space.levels):
            return 0
        conn = self._u64(ctx + h.subflow_conn)
        return conn if is_kernel_pointer(conn, self.space.levels) else 0

    def find_listener(self, flow: Flow) -> FoundSock | None:
        """The TCP listener that would take a new connection for `flow`. The grant keeper
        asks the same few flows four times a second: an answer is remembered with every read
        it was decoded from, and given again only when each of those reads gives the same
        bytes now (`_replayed`); any difference, and the lookup is made afresh."""
        self._start()
        self.listener_lookups += 1
        memo = self._listener_memo.get(flow)
        if memo is not None and self._replayed(memo[0]):
            self.listener_replays += 1
            return memo[1]
        recorder = _RecordingSpace(self.space)
        space, self.space = self.space, cast(AddressSpace, recorder)
        found: FoundSock | None = None
        try:
            found = self._listener(unmap_v4(flow))
        except MemoryReadError as e:
            self._unreadable(e)
        finally:
            self.space = space
        if self.errors:  # a torn or bounded lookup is never given again
            self._listener_memo.pop(flow, None)
        else:
            if len(self._listener_memo) >= LISTENER_MEMO_MAX:
                self._listener_memo.clear()
            self._listener_memo[flow] = (tuple(recorder.reads), found)
        return found

    def _replayed(self, reads: tuple[tuple[int, bytes], ...]) -> bool:
        """Every read of a remembered lookup gives the same bytes again, in the same order,
        through the same address space (its translations as the lookup would use them). The
        lookup is a function of those bytes (and of the hash secrets and bucket arrays, read
        among them or cached for the boot): equal bytes, equal answer, with no decode, no
        scoring, no chain bookkeeping. Bounded: as many reads as the lookup made."""
        read = self.space.read
        try:
            for vaddr, data in reads:
                if read(vaddr, len(data)) != data:
                    return False
        except MemoryReadError:
            return False
        return True

    def _start(self) -> None:
        self.errors = []
        self._deadline = Deadline.after(LOOKUP_SECONDS)

    def _unreadable(self, e: MemoryReadError) -> None:
        self.errors.append(WalkIssue("socket lookup", WalkReason.UNREADABLE, e.address, -1, str(e)))

    # -- chains -------------------------------------------------------------------------------

    def _chain(
        self, bucket: int, node_off: int, what: str, stop: Callable[[bytes], bool] | None = None
    ) -> list[tuple[int, bytes]]:
        """(sock address, its sock_common bytes) of each sock on the (nulls) hlist headed at
        `bucket`, bounded, cycle-safe, each node's pprev checked (== &previous->next, the bucket
        for the first). One read per sock: the node (next, pprev) is inside sock_common, so the
        head the caller matches on is the bytes the link was read from."""
        first = self._u64(bucket)
        if first == 0 or first & 1:  # an empty bucket (most of a lookup's): no walk to set up
            return []
        span = max(self.h.sock_common_size, node_off + _LINKS.size)
        low = KERNEL_SPACE_START_LA57 if self.space.levels == 5 else KERNEL_SPACE_START
        walked = walk_hlist(
            what,
            bucket,
            first,
            self.space.read,
            node_off,
            span,
            low,
            self._deadline,
            MAX_CHAIN,
            stop,
        )
        if walked.issue is not None:
            self.errors.append(walked.issue)
        return [(node - node_off, head) for node, head in walked.nodes]

    def _full(self, sk: int, head: bytes) -> InetSock | None:
        """Decode a full struct sock (for sk_uid/protocol) or, for the sock_common-only
        time-wait and request socks, just its head."""
        state = head[self.layout.skc_state]
        if state in (TCPState.TIME_WAIT, TCPState.NEW_SYN_RECV):
            return decode_inet_sock(self.layout, sk, head, self._addresses)
        blob = self.space.read(sk, self.layout.sock_span)
        return decode_inet_sock(self.layout, sk, blob, self._addresses)

    def _in_init_net(self, head: bytes) -> bool:
        net: int = _U64.unpack_from(head, self.h.skc_net)[0]
        return net == self.h.init_net + self.shift

    # -- TCP ------------------------------------------------------------------------------------

    def _established(self, flow: Flow) -> FoundSock | None:
        h, lay, sec, tab = self.h, self.layout, self.secrets(), self.tables()
        ehash, mask = tab.ehash, tab.ehash_mask
        fb = self._flow_bytes(flow)
        local, remote = fb.local, fb.remote
        if flow.family == 4:
            key = jhash.inet_ehashfn(
                local, flow.lport, remote, flow.rport, (sec.ehash + sec.hash_mix) & jhash.M32
            )
        else:
            key = jhash.inet6_ehashfn(
                local, flow.lport, remote, flow.rport, sec.ehash6, sec.ipv6, sec.hash_mix
            )

        def matches(head: bytes) -> bool:
            return (
                _ports_match(lay, head, fb)
                and _addresses_match(lay, head, fb)
                and self._in_init_net(head)
            )

        # The chain is followed up to the first sock of the flow, as __inet_lookup_established
        # stops there (half the reads of a full chain on average).
        chain = self._chain(ehash + (key & mask) * 8, h.skc_nulls_node, "ehash", matches)
        if not chain or not matches(chain[-1][1]):
            return None
        sk, head = chain[-1]
        state = head[lay.skc_state]
        sock = self._full(sk, head)
        if sock is None:
            return None
        if state == TCPState.TIME_WAIT:
            return FoundSock(sock, HashTable.TIME_WAIT)
        if state == TCPState.NEW_SYN_RECV:
            listener: int = _U64.unpack_from(head, h.skc_listener)[0]
            return FoundSock(sock, HashTable.REQUEST, listener)
        return FoundSock(sock, HashTable.ESTABLISHED)

    def _listener(self, flow: Flow) -> FoundSock | None:
        """inet_lhash2_lookup: the (address, port) bucket, then the (any, port) one."""
        h, sec, tab = self.h, self.secrets(), self.tables()
        lhash2, mask = tab.lhash2, tab.lhash2_mask
        fb = self._flow_bytes(flow)
        keys = self._listener_keys.get((fb.local, fb.lport, sec.hash_mix))
        if keys is None:
            if flow.family == 4:
                keys = (
                    jhash.ipv4_portaddr_hash(fb.local, flow.lport, sec.hash_mix),
                    jhash.ipv4_portaddr_hash(_ANY4, flow.lport, sec.hash_mix),
                )
            else:
                keys = (
                    jhash.ipv6_portaddr_hash(fb.local, flow.lport, sec.hash_mix),
                    jhash.ipv6_portaddr_hash(_ANY6, flow.lport, sec.hash_mix),
                )
            if len(self._listener_keys) >= LISTENER_KEYS_MAX:
                self._listener_keys.clear()
            self._listener_keys[(fb.local, fb.lport, sec.hash_mix)] = keys
        best: tuple[int, FoundSock] | None = None
        for key in dict.fromkeys(keys):  # the two may coincide
            bucket = lhash2 + (key & mask) * h.lbucket_size + h.lbucket_head
            for sk, head in self._chain(bucket, h.skc_nulls_node, "lhash2"):
                score = _listener_score(self.layout, head, fb)
                if score > 0 and self._in_init_net(head) and (best is None or score > best[0]):
                    sock = self._full(sk, head)
                    if sock is not None and sock.state == TCPState.LISTEN:
                        best = (score, FoundSock(sock, HashTable.LISTENER))
        return best[1] if best else None

    # -- UDP ------------------------------------------------------------------------------------

    def _udp(self, flow: Flow, lite: bool = False) -> FoundSock | None:
        """udp4/6_lib_lookup1 on the port-hashed table, with the kernel's scoring."""
        h, sec, tab = self.h, self.secrets(), self.tables()
        if lite:
            hash_base, mask = tab.udplite_hash, tab.udplite_mask
            proto, table = IPProto.UDPLITE, HashTable.UDPLITE
            if not hash_base:
                return None
        else:
            hash_base, mask = tab.udp_hash, tab.udp_mask
            proto, table = IPProto.UDP, HashTable.UDP
        slot = hash_base + ((flow.lport + sec.hash_mix) & mask) * h.hslot_size + h.hslot_head
        fb = self._flow_bytes(flow)
        scores: list[int] = []  # of each node of the chain, in order
        num, want = self.layout.skc_num, fb.num

        def exact(head: bytes) -> bool:
            if head[num : num + 2] != want:  # another port's sock (most of a chain): score 0
                scores.append(0)
                return False
            score = _udp_score(self.layout, head, fb)
            if score and not self._in_init_net(head):
                score = 0
            scores.append(score)
            return score == UDP_BEST_SCORE

        # udp4_lib_lookup2 keeps the first sock of the highest score: none can beat a sock
        # bound and connected to the flow's every field, the chain is followed up to it.
        best: tuple[int, FoundSock] | None = None
        chain = self._chain(slot, h.skc_node, _CHAIN_NAMES[table], exact)
        for (sk, head), score in zip(chain, scores, strict=True):
            if score > 0 and (best is None or score > best[0]):
                sock = self._full(sk, head)
                if sock is not None and sock.proto == proto:
                    best = (score, FoundSock(sock, table))
        return best[1] if best else None

    # -- ICMP echo and raw ----------------------------------------------------------------------

    def _ping(self, flow: Flow) -> FoundSock | None:
        """ping_lookup: the socket whose skc_num is the echo identifier (`flow.lport`), of the
        flow's family, its bound address (if any) the flow's local one."""
        h = self.h
        if not h.ping_table or h.ping_buckets <= 0:
            return None
        slot = (flow.lport + self.secrets().hash_mix) & (h.ping_buckets - 1)
        bucket = h.ping_table + self.shift + h.ping_hash + slot * 8
        want = IPProto.ICMP if flow.family == 4 else IPProto.ICMPV6
        for sk, head in self._chain(bucket, h.skc_nulls_node, "ping hash"):
            if _u16(head, self.layout.skc_num) != flow.lport or not self._in_init_net(head):
                continue
            sock = self._full(sk, head)
            if sock is None or sock.proto != want or sock.family != flow.family:
                continue
            if not _bound_matches(sock, flow):
                continue
            return FoundSock(sock, HashTable.PING)
        return None

    def _raw(self, flow: Flow) -> FoundSock | None:
        """A raw socket of the flow's IP protocol (skc_num), or an IPPROTO_RAW one (it may
        send any protocol), its bound/connected addresses matching; every bucket is read."""
        h = self.h
        table = h.raw_v4_hashinfo if flow.family == 4 else h.raw_v6_hashinfo
        if not table or h.raw_buckets <= 0:
            return None
        base = table + self.shift + h.raw_ht
        heads = self.space.read(base, h.raw_buckets * 8)
        found: dict[int, FoundSock] = {}
        for i, (first,) in enumerate(struct.iter_unpack("<Q", heads)):
            if first == 0 or first & 1:  # empty: NULL or a nulls marker
                continue
            for sk, head in self._chain(base + i * 8, h.skc_node, "raw hash"):
                num = _u16(head, self.layout.skc_num)
                if num not in (flow.proto, IPProto.RAW) or num in found:
                    continue
                if not self._in_init_net(head):
                    continue
                sock = self._full(sk, head)
                if sock is not None and sock.family == flow.family and _bound_matches(sock, flow):
                    found[num] = FoundSock(sock, HashTable.RAW)
        return found.get(flow.proto) or found.get(IPProto.RAW)


_CHAIN_NAMES = {t: f"{t} hash" for t in (HashTable.UDP, HashTable.UDPLITE)}


# -- matching (pure, over a sock_common head) ----------------------------------------------------


def _u16(blob: bytes, off: int, fmt: str = "<H") -> int:
    value: int = struct.unpack_from(fmt, blob, off)[0]
    return value


class FlowBytes(NamedTuple):
    """A flow's fields as the matching below compares them with a sock_common: the addresses
    as bytes once per lookup (IPv4Address.packed is rebuilt from an int on every access)."""

    family: int
    lport: int
    rport: int
    local: bytes
    remote: bytes
    num: bytes  # lport as skc_num holds it (host order: little-endian on x86-64)
    dport: bytes  # rport as skc_dport holds it (__be16)

    @classmethod
    def of(cls, flow: Flow) -> FlowBytes:
        lport, rport = flow.lport, flow.rport
        return cls(
            flow.family,
            lport,
            rport,
            flow.local.packed,
            flow.remote.packed,
            lport.to_bytes(2, "little") if 0 <= lport <= 0xFFFF else b"",  # b"": no match
            rport.to_bytes(2, "big") if 0 <= rport <= 0xFFFF else b"",
        )


def _ports_match(lay: KernelLayout, head: bytes, flow: FlowBytes) -> bool:
    # Byte compares (no unpack): a chain's socks are mostly other flows' (ports differ).
    num, dport = lay.skc_num, lay.skc_dport
    return head[num : num + 2] == flow.num and head[dport : dport + 2] == flow.dport


def _v4_view(lay: KernelLayout, head: bytes) -> tuple[bytes, bytes]:
    return (
        head[lay.skc_rcv_saddr : lay.skc_rcv_saddr + 4],
        head[lay.skc_daddr : lay.skc_daddr + 4],
    )


def _v6_view(lay: KernelLayout, head: bytes) -> tuple[bytes, bytes]:
    return (
        head[lay.skc_v6_rcv_saddr : lay.skc_v6_rcv_saddr + 16],
        head[lay.skc_v6_daddr : lay.skc_v6_daddr + 16],
    )


def _family(lay: KernelLayout, head: bytes) -> int:
    return lay.skc_family.get(head)


def _addresses_match(lay: KernelLayout, head: bytes, flow: FlowBytes) -> bool:
    """INET_MATCH / inet6_match: an IPv4 flow matches the v4 address pair, which v4-mapped
    IPv6 sockets fill in too; an IPv6 flow only AddressFamily.INET6 sockets."""
    if flow.family == 4:
        return _v4_view(lay, head) == (flow.local, flow.remote)
    return _family(lay, head) == AddressFamily.INET6 and _v6_view(lay, head) == (
        flow.local,
        flow.remote,
    )


_ANY4 = bytes(4)
_ANY6 = bytes(16)


def _listener_score(lay: KernelLayout, head: bytes, flow: FlowBytes) -> int:
    """0 if the listener can't take `flow`, else higher for a better match (compute_score)."""
    if head[lay.skc_num : lay.skc_num + 2] != flow.num:
        return 0
    fam = _family(lay, head)
    if flow.family == 4:
        if fam == AddressFamily.INET:
            addr = _v4_view(lay, head)[0]
            base = 2
        elif fam == AddressFamily.INET6:
            # A dual-stack listener takes IPv4 only bound to :: (ipv6only is not read here).
            v6 = _v6_view(lay, head)[0]
            if v6 != _ANY6:
                return 0
            addr, base = _ANY4, 1
        else:
            return 0
        if addr == flow.local:
            return base + 4
        return base if addr == _ANY4 else 0
    if fam != AddressFamily.INET6:
        return 0
    v6 = _v6_view(lay, head)[0]
    if v6 == flow.local:
        return 6
    return 2 if v6 == _ANY6 else 0


# _udp_score of a sock of the flow's family bound to its local address and port and connected
# to its remote address and port: no sock scores higher.
UDP_BEST_SCORE = 2 + 4 + 4 + 4


def _udp_score(lay: KernelLayout, head: bytes, flow: FlowBytes) -> int:
    """udp4/6 compute_score: bound local port, then each bound field must match and scores."""
    if head[lay.skc_num : lay.skc_num + 2] != flow.num:
        return 0
    fam = _family(lay, head)
    if flow.family == 4:
        if (
            fam == AddressFamily.INET6
            and _v6_view(lay, head)[0] not in (_ANY6,)
            and not _v6_view(lay, head)[0].startswith(b"\0" * 10 + b"\xff\xff")
        ):
            return 0
        score = 2 if fam == AddressFamily.INET else 1
        laddr, raddr = _v4_view(lay, head)
        any_addr = _ANY4
    else:
        if fam != AddressFamily.INET6:
            return 0
        score = 2
        laddr, raddr = _v6_view(lay, head)
        any_addr = _ANY6
    for bound, want in ((laddr, flow.local), (raddr, flow.remote)):
        if bound != any_addr:
            if bound != want:
                return 0
            score += 4
    dport = _u16(head, lay.skc_dport, ">H")
    if dport:
        if dport != flow.rport:
            return 0
        score += 4
    return score


def _bound_matches(sock: InetSock, flow: Flow) -> bool:
    """A socket bound to an address (or connected to one) takes only flows with it."""
    if not sock.local.is_unspecified and sock.local != flow.local:
        return False
    return sock.remote.is_unspecified or sock.remote == flow.remote


def unmap_v4(flow: Flow) -> Flow:
    """An IPv6 flow between v4-mapped addresses is IPv4 on the wire and in the kernel's tables."""
    if flow.family == 6:
        local, remote = flow.local, flow.remote
        assert isinstance(local, IPv6Address) and isinstance(remote, IPv6Address)
        if local.ipv4_mapped is not None and remote.ipv4_mapped is not None:
            return Flow(flow.proto, local.ipv4_mapped, flow.lport, remote.ipv4_mapped, flow.rport)
    return flow
