"""Listeners whose new connections the kernel may accept without asking the engine (issue 9).

A flood of new flows by a blocked owner reaches the engine one first packet at a time; incoming
connections to a good owner's service would wait behind it in the same queue. So the refresher
grants, per walk, the listeners it can prove are good ones: their (family, guest address,
tcp:port) go into ``xfgate-D-lsn4|6`` (``hash:net,port`` with a per-entry timeout), and an
incoming SYN of a new conntrack flow to one of them is accepted in the kernel with the
settled-accept connmark (chain ``XFGATE-D-LSN``): its SYN-ACK and the rest of the flow follow.

What makes a listener grantable (``listener_grants``), on a **complete** view only (an
incomplete view grants nothing new; it carries the last complete view's grants it still bears
out, for at most ``CARRY_SECONDS``: ``carried_grants``):

- it is a TCP listener bound to an address a SYN from the vif can reach: not loopback (a
  crowded guest's 1,200 loopback listeners cost 4,800 renewals a second and served nothing);
- it is a TCP listener (not MPTCP: its subflow listener is another story) on a port the policy
  does not block outright;
- every socket of the view that could take a SYN to that (family, address, port) — listeners
  and bound sockets on the same port whose address covers it, across families for a ``[::]``
  socket without ``IPV6_V6ONLY``, SO_REUSEPORT siblings included — has visible holders, none of
  them blocked, and a creator (``sk_uid``) the policy does not block, also not as "the uid of a
  blocked task" (``Policy.creator_blocked``). The last rule closes what a blocked owner could do
  to share a good listener between two walks: SO_REUSEPORT siblings and a specific-address bind
  beside a wildcard listener need the listener's uid (``sk_reuseport`` + ``uid_eq`` in
  ``inet_csk_bind_conflict``), and so does taking its fd (ptrace, ``pidfd_getfd``). Connected
  sockets on the port do not count: a new SYN meets them only from their own peer, whose
  conntrack entry exists already (the rule takes NEW flows only).

A grant holds one second (``GRANT_TTL``, the engine's listener cache TTL) unless the keeper
renews it: every ``KEEP_INTERVAL`` the refresher looks the listener up again in the guest's
``lhash2`` (``lookup_listener``, the lookup the engine does for a SYN) and renews the entry only
if the same sock answers (``sock_addr``), through ``Via.LISTENER``, with known holders the
policy accepts; else the entry is deleted at once. A listener that closes, changes hands or is
joined by a blocked owner's socket is therefore out of the set within about a second, as it is
out of the engine's listener cache — no longer window than the queue path had. A policy change
revokes every grant before the settled flows are reset. Known limit, the queue path's own: the
members of an SO_REUSEPORT group that appeared after the last walk are not told apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address, ip_address

from xfgate.flow import Flow, GuestSocket, IPAddress, Ownership, Via
from xfgate.inet import IPProto
from xfgate.verdict.blocksets import AF_INET, AF_INET6, WILDCARD, BlockEntry, socket_entries
from xfgate.verdict.nfnetlink import SetType
from xfgate.verdict.policy import (
    KERNEL_ONLY_STATES,
    GuestFacts,
    Policy,
    Verdict,
    decide,
)
from xfgate.vmi.kernel_constants import IPPROTO_MPTCP

GRANT_TTL = 1  # seconds (ipset timeouts are whole seconds); the engine's listener_ttl
KEEP_INTERVAL = 0.25  # how often the keeper renews the grants
# How long the grants of the last complete view are carried through incomplete ones.
CARRY_SECONDS = 10.0
LISTENER_SET = {
    4: SetType("hash:net,port", AF_INET, "net,port", timeout=GRANT_TTL),
    6: SetType("hash:net,port", AF_INET6, "net,port", timeout=GRANT_TTL),
}
UNSPECIFIED: dict[int, IPAddress] = {4: IPv4Address(0), 6: IPv6Address(0)}


def listener_set_name(domain: int, family: int) -> str:
    return f"xfgate-{domain}-lsn{family}"


def listener_set_names(domain: int) -> list[str]:
    return [listener_set_name(domain, fam) for fam in (4, 6)]


@dataclass(frozen=True, slots=True)
class ListenerGrant:
    """One set entry of a good listener, with what the keeper checks before renewing it."""

    entry: BlockEntry  # (family, tcp, port, guest address or wildcard half)
    probe: Flow  # the flow the listener is looked up with (remote unspecified)
    socks: frozenset[int]  # the sock addresses of the listeners the walk saw there


def _overlaps(a: BlockEntry, b: BlockEntry) -> bool:
    """Two port entries of one family that a packet's destination can match both."""
    wild = WILDCARD[a.family]
    return a.family == b.family and (a.local == b.local or a.local in wild or b.local in wild)


def _reach(s: GuestSocket) -> list[BlockEntry]:
    """The (family, address, port) a socket takes TCP SYNs on (an MPTCP socket's as TCP's:
    its subflow listener is in the same lhash2)."""
    return socket_entries(replace(s, proto=IPProto.TCP))


def _good(s: GuestSocket, policy: Policy, facts: GuestFacts) -> bool:
    """Held by visible tasks, none blocked, and a creator no rule blocks."""
    if not s.owners or policy.creator_blocked(s.sk_uid, facts) is not None:
        return False
    ownership = Ownership(s.owners, s.sk_uid, s.state, Via.WALK, s.sock_addr)
    d = decide(ownership, None, policy, facts=facts)
    return d.verdict is Verdict.ACCEPT and d.known and d.settle


def _loopback(address: IPAddress) -> bool:
    """A loopback address (127/8, ::1, ::ffff:127.0.0.0/104): a SYN from the vif does not reach a
    listener bound there (the guest drops it as a martian unless route_localnet is set), so it
    is never granted: a grant would cost a renewal every KEEP_INTERVAL and serve nothing (not
    granting is always safe: the SYN goes to the engine). It still counts as a rival of
    a wildcard grant (whose nets cover 127/8)."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _probe(entry: BlockEntry) -> Flow:
    local = entry.local
    family = entry.family
    address = UNSPECIFIED[family] if local in WILDCARD[family] else ip_address(local)
    return Flow(IPProto.TCP, address, entry.port, UNSPECIFIED[family], 0)


def listener_grants(
    sockets: Iterable[GuestSocket], policy: Policy, facts: GuestFacts
) -> set[ListenerGrant]:
    """The good listeners of a complete view (see the module's docstring); none otherwise."""
    if not facts.complete:
        return set()
    return _grants(sockets, policy, facts)


def carried_grants(
    previous: set[ListenerGrant],
    sockets: Iterable[GuestSocket],
    policy: Policy,
    facts: GuestFacts,
) -> set[ListenerGrant]:
    """The grants of the last complete view that an incomplete one still bears out: the same
    entry with the same listener socks, every socket the incomplete view shows on it good.

    An incomplete view proves no absence, so it grants nothing new; but withdrawing every grant
    on each incomplete walk (a flood's churning fd tables tear a read now and then) sent a good
    service's new connections into the queue behind the flood for the walk's interval. What it
    does show still refuses: a blocked rival, a listener gone or changed. What it cannot show
    is the window between two complete walks the grants always had; the caller bounds it
    (CARRY_SECONDS after the last complete view), and the keeper's per-renewal lookup stands."""
    # Judged as on a complete view: the facts of an incomplete one are the union with the
    # last complete view's (a blocked owner and its lineage stay), only flagged incomplete.
    now = _grants(sockets, policy, replace(facts, complete=True))
    return previous & now


def _grants(
    sockets: Iterable[GuestSocket], policy: Policy, facts: GuestFacts
) -> set[ListenerGrant]:
    by_port: dict[int, list[GuestSocket]] = {}
    for s in sockets:
        unconnected = not s.rport and s.state not in KERNEL_ONLY_STATES
        if s.proto in (IPProto.TCP, IPPROTO_MPTCP) and unconnected and 0 < s.lport < 65536:
            by_port.setdefault(s.lport, []).append(s)
    grants: set[ListenerGrant] = set()
    for port, group in by_port.items():
        if (IPProto.TCP, port) in policy.block_ports:
            continue
        for s in group:
            if s.proto != IPProto.TCP or s.state != "LISTEN" or _loopback(s.local):
                continue
            for entry in socket_entries(s):
                rivals = [r for r in group if any(_overlaps(entry, e) for e in _reach(r))]
                if not all(_good(r, policy, facts) for r in rivals):
                    continue
                listening = frozenset(r.sock_addr for r in rivals if r.state == "LISTEN")
                grants.add(ListenerGrant(entry, _probe(entry), listening))
    return grants


def keeper_facts(facts: GuestFacts, since_complete: float) -> GuestFacts:
    """The facts the keeper judges renewals on. After an incomplete view the engine's facts
    are the union with the last complete view's (nothing taken away: a blocked owner, its
    lineage stay blocked), marked incomplete so the engine settles no accept; within
    CARRY_SECONDS of the last complete view the carried grants are judged on them as on a
    complete view, later not at all (``decide`` then settles nothing, nothing is renewed)."""
    if facts.complete or since_complete > CARRY_SECONDS:
        return facts
    return replace(facts, complete=True)


def renewable(
    grant: ListenerGrant, answer: Ownership | None, policy: Policy, facts: GuestFacts
) -> bool:
    """The keeper's check: the guest's lhash2 still answers the probe with one of the granted
    listener socks, through the listener itself, with known holders the policy accepts."""
    if answer is None or answer.via is not Via.LISTENER or not answer.holders_known:
        return False
    if answer.sock_addr not in grant.socks or not answer.owners:
        return False
    if policy.creator_blocked(answer.sk_uid, facts) is not None:
        return False
    d = decide(answer, grant.probe, policy, facts=facts)
    return d.verdict is Verdict.ACCEPT and d.known and d.settle
