"""The per-packet decision: exactly one verdict for every queued packet, always.

``evaluate`` turns raw bytes into a Decision (parse -> flow -> cached or introspected owner ->
policy); ``handle`` wraps it so that no exception, from our code or from guest memory, can leave
a packet without a verdict or stop the queue loop.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from xfgate.flow import (
    Direction,
    Flow,
    GuestSocket,
    GuestView,
    Owner,
    Ownership,
    OwnerSource,
    Via,
)
from xfgate.inet import IPProto, TCPFlag, proto_label
from xfgate.verdict.cache import AnswerSource, CacheKey, ListenerKey, OwnerCache
from xfgate.verdict.fastpath import MARK_MASK, settle_mark
from xfgate.verdict.log import VerdictLog
from xfgate.verdict.packet import (
    ECHO_REQUEST_TYPES,
    ICMPV6_NDP_TYPES,
    Malformed,
    ParsedPacket,
    direction_of,
    parse,
    to_flow,
)
from xfgate.verdict.policy import (
    NO_FACTS,
    Decision,
    GuestFacts,
    Policy,
    Verdict,
    decide,
    decide_unanswered,
    decide_unattributable,
)

LOOKUP_ATTEMPTS = 2  # live memory tears now and then: one retry, then give up
# Answers that are the listening socket's, not one connection's (see Engine._syn_owner).
LISTENER_VIAS = frozenset({Via.LISTENER, Via.REQUEST_SOCK_LISTENER, Via.TIME_WAIT_LISTENER})
LISTENER_STATES = frozenset({"LISTEN", "NEW_SYN_RECV", "SYN_RECV"})
# How long a packet waits for the owner source (held by a walk): then the safe verdict.
PACKET_WAIT = 0.05
# How long a walk or a control-side caller waits for it.
WALK_WAIT = 5.0
# DHCPv4 client -> server (RFC 2131): sent from packet sockets, not UDP sockets.
DHCP_CLIENT_PORTS = frozenset({(68, 67)})
# The oldest view a packet no socket sends is judged on (a walk is taken on the packet path,
# at most once per this interval, when the last one is older).
FRESH_VIEW = 0.05

log = logging.getLogger(__name__)


def from_listener(ownership: Ownership) -> bool:
    """The answer is a listening socket's (or a request sock's under it), not a connection's."""
    return ownership.via in LISTENER_VIAS or ownership.state in LISTENER_STATES


# The flag masks as plain ints, made once: an IntFlag `|` builds a new member per packet.
_SYN, _RST = int(TCPFlag.SYN), int(TCPFlag.RST)
_SYN_ACK, _SYN_ACK_RST = (
    int(TCPFlag.SYN | TCPFlag.ACK),
    int(TCPFlag.SYN | TCPFlag.ACK | TCPFlag.RST),
)


def kernel_sent(parsed: ParsedPacket) -> str:
    """Why an outgoing packet that matches no socket is one the guest kernel sends on its own
    (an ICMP error about a flow, a TCP reset for no socket), or "" if it is not such a one."""
    if parsed.embedded is not None:
        return "icmp error, no socket for the embedded flow"
    if parsed.proto == IPProto.TCP and parsed.tcp_flags & _RST:
        return "kernel tcp reset for no socket"
    return ""


def is_bare_syn(parsed: ParsedPacket) -> bool:
    """A TCP SYN without ACK or RST: a connection's first packet, never one the guest kernel
    sends on its own (it answers for no socket only with RSTs and ICMP errors)."""
    return (
        parsed.proto == IPProto.TCP
        and parsed.embedded is None
        and parsed.tcp_flags & _SYN_ACK_RST == _SYN
    )


def opens_a_flow(parsed: ParsedPacket) -> str:
    """What an outgoing packet is when only a socket sends it and it may open a flow: a TCP SYN,
    a UDP or UDP-Lite datagram, an ICMP/ICMPv6 echo request ("" otherwise). The guest kernel
    sends none of these for no socket (for no socket it sends RSTs and ICMP errors; its own
    UDP tunnels and echo replies have sockets or are told apart before), so one whose socket
    the lookup does not find was sent by a socket closed before its verdict (connect or send,
    then close: a flood does it by the thousand while the queue is long) or forged."""
    if parsed.embedded is not None:
        return ""
    if is_bare_syn(parsed):
        return "tcp SYN"
    if parsed.proto == IPProto.UDP and (parsed.sport, parsed.dport) in DHCP_CLIENT_PORTS:
        # A DHCP client (udhcpc, dhclient) sends from an AF_PACKET socket, no UDP socket: judged
        # by the raw/packet-socket holders as before. Port 68 needs privilege to bind, so a
        # blocked unprivileged user cannot send-and-close through this exception.
        return ""
    if parsed.proto in (IPProto.UDP, IPProto.UDPLITE):
        return f"{proto_label(parsed.proto)} datagram"
    if parsed.echo_id >= 0 and parsed.icmp_type in ECHO_REQUEST_TYPES:
        return f"{proto_label(parsed.proto)} echo request"
    return ""


def is_connection_request(parsed: ParsedPacket, direction: Direction) -> bool:
    """An incoming TCP SYN (no ACK, no RST): the guest kernel hands it to a listener."""
    return (
        direction is Direction.TO_GUEST
        and parsed.proto == IPProto.TCP
        and parsed.embedded is None
        and parsed.tcp_flags & _SYN_ACK_RST == _SYN
    )


@runtime_checkable
class CreatorShortcut(Protocol):
    """An owner source that can skip the walk for a sock whose creator alone decides
    (GuestIntrospector.creator_decides); the gate sets it to its current policy's
    ``Policy.blocks_creator``."""

    creator_decides: Callable[[int], bool] | None


class QueuedPacket(Protocol):
    """What we use of netfilterqueue.Packet (also implemented by test fakes)."""

    physindev: int
    physoutdev: int

    def get_payload(self) -> bytes: ...
    def get_mark(self) -> int: ...
    def set_mark(self, mark: int) -> None: ...
    def accept(self) -> None: ...
    def drop(self) -> None: ...
    def repeat(self) -> None: ...


def source_degraded(source: object) -> str:
    """What an owner source says it cannot do, "" if nothing (GuestIntrospector.degraded():
    a profile lacking what targeted lookups need). Optional for a source."""
    find = getattr(source, "degraded", None)
    if not callable(find):
        return ""
    try:
        value = find()
    except Exception:  # a source that cannot say is not degraded by saying so
        return ""
    return value if isinstance(value, str) else ""


class LockedOwnerSource:
    """Serializes access to an OwnerSource shared by the packet loop and the refresher.

    Fair enough that a flood cannot starve the refresher: CPython's lock is no hand-off, so a
    packet thread that releases it and asks again within one GIL slice would win every time
    (a flood of new flows keeps it asking). Every caller first takes a turnstile, then the
    lock, then lets the turnstile go: a refresher waiting for the lock holds the turnstile,
    so the packet thread's next request waits (within its own bound) until the refresher had
    its turn.
    """

    def __init__(
        self, source: OwnerSource, timeout: float = WALK_WAIT, packet_timeout: float = PACKET_WAIT
    ) -> None:
        self._source = source
        self._lock = threading.Lock()
        self._turnstile = threading.Lock()
        self._timeout = timeout  # walks (view, sockets) and closing
        self._packet_timeout = packet_timeout  # lookups on the packet path
        self._generation = 0
        # A source whose generation() is one attribute read (GuestIntrospector) is asked
        # without the lock: one lock per packet (the lookup's), none for a cache hit.
        self._generation_lock_free = getattr(source, "generation_lock_free", False) is True

    @property
    def inner(self) -> OwnerSource:
        """The wrapped source (for counters such as an introspector's pauses; not locked)."""
        return self._source

    def _try_acquire(self, wait: float) -> bool:
        turnstile, lock = self._turnstile, self._lock
        if turnstile.acquire(False):  # nobody waiting (every packet's case): no timed waits
            try:
                return lock.acquire(False) or lock.acquire(timeout=wait)
            finally:
                turnstile.release()
        deadline = time.monotonic() + wait
        if not self._turnstile.acquire(timeout=wait):
            return False
        try:
            return self._lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            self._turnstile.release()

    def _acquire(self, timeout: float | None = None) -> None:
        wait = self._timeout if timeout is None else timeout
        if not self._try_acquire(wait):
            raise TimeoutError(f"owner source busy for more than {wait * 1000:.0f} ms")

    def lookup(self, flow: Flow) -> Ownership | None:
        self._acquire(self._packet_timeout)
        try:
            return self._source.lookup(flow)
        finally:
            self._lock.release()

    def degraded(self) -> str:
        """The source's own degraded() (fixed when it was built: no lock needed)."""
        return source_degraded(self._source)

    def lookup_listener(self, flow: Flow) -> Ownership | None:
        """The listener's answer for a new connection to `flow`'s local end, if the source
        can look listeners up on their own (GuestIntrospector can); else None."""
        find = getattr(self._source, "lookup_listener", None)
        if not callable(find):
            return None
        self._acquire(self._packet_timeout)
        try:
            answer: Ownership | None = find(flow)
            return answer
        finally:
            self._lock.release()

    def sockets(self) -> Sequence[GuestSocket]:
        self._acquire()
        try:
            return self._source.sockets()
        finally:
            self._lock.release()

    def view(self, timeout: float | None = None) -> GuestView:
        """One full walk (the source's view()); `timeout`: how long to wait for the source."""
        self._acquire(timeout)
        try:
            return self._source.view()
        finally:
            self._lock.release()

    def refresh(self, watch: Callable[[Owner], bool] | None = None) -> GuestView:
        """The refresher's view: the source's incremental `refresh_view(watch)` when it has
        one (GuestIntrospector), else a full `view()`. A full walk the source says is due runs
        in three steps, only the first and last holding the lock: the packet path's lookups
        go on while a crowded guest is walked for seconds."""
        source = self._source
        refresh = getattr(source, "refresh_view", None)
        if not callable(refresh):
            return self.view()
        self._acquire()
        try:
            source.watch = watch  # type: ignore[attr-defined]
            plan = source.prepare_full_walk() if source.full_walk_due() else None  # type: ignore[attr-defined]
            if plan is None:
                view: GuestView = refresh(watch)
                return view
        finally:
            self._lock.release()
        result = source.run_full_walk(plan)  # type: ignore[attr-defined]
        self._acquire()
        try:
            done: GuestView = source.finish_full_walk(plan, result)  # type: ignore[attr-defined]
            return done
        finally:
            self._lock.release()

    def locked(self, fn: Callable[[OwnerSource], Any], timeout: float | None = None) -> Any:
        """fn(source) with the lock held, waiting at most `timeout` (the walks' wait): short
        steps of the control thread (a `ps` request's plan) that must not race a refresh."""
        self._acquire(timeout)
        try:
            return fn(self._source)
        finally:
            self._lock.release()

    def close(self) -> None:
        closer = getattr(self._source, "close", None)
        if callable(closer) and self._try_acquire(self._timeout):
            try:
                closer()
            finally:
                self._lock.release()

    def generation(self) -> int:
        """The source's generation; the last one read while a walk holds the source (the
        packet path never waits on a walk for it)."""
        if self._generation_lock_free:
            self._generation = self._source.generation()
            return self._generation
        if not self._try_acquire(self._packet_timeout):
            return self._generation
        try:
            self._generation = self._source.generation()
            return self._generation
        finally:
            self._lock.release()


@dataclass(frozen=True, slots=True)
class Evaluation:
    decision: Decision
    source: AnswerSource
    parsed: ParsedPacket | None = None
    flow: Flow | None = None
    direction: Direction | None = None
    ownership: Ownership | None = None


# Upper bounds of the verdict latency histogram, ns: 25 us .. 1 s.
LATENCY_BOUNDS_NS = tuple(
    int(x * 1000)
    for x in (25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000)
)


@dataclass
class EngineStats:
    packets: int = 0
    accepted: int = 0
    dropped: int = 0
    settled: int = 0
    errors: int = 0
    verdict_failures: int = 0  # the binding refused our verdict (should stay 0)
    by_source: dict[AnswerSource, int] = field(default_factory=dict)
    latency_ns_total: int = 0
    latency_ns_max: int = 0
    # (verdict, source) -> packets; and how many verdicts took at most each LATENCY_BOUNDS_NS
    # (one more slot: above the last bound), for the metrics' histogram.
    by_verdict_source: dict[tuple[str, str], int] = field(default_factory=dict)
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS_NS) + 1))

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["by_source"] = dict(self.by_source)
        del d["by_verdict_source"], d["latency_counts"]
        d["latency_us_avg"] = (
            round(self.latency_ns_total / self.packets / 1000, 1) if self.packets else 0
        )
        return d


class Engine:
    def __init__(
        self,
        domain: int,
        vifs: Mapping[int, str],  # ifindex -> vif name
        source: OwnerSource,
        policy: Policy,
        cache: OwnerCache,
        log: VerdictLog | None = None,
        fastpath: bool = True,
        on_error: Verdict | None = None,
        clock: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        self.domain = domain
        self.vifs = dict(vifs)
        self._vif_indexes = frozenset(vifs)
        self.source = source
        # Lookups answered from walks only (see source_degraded): unknowns say so, unsettled.
        self.degraded = source_degraded(source)
        self._policy = policy
        self.cache = cache
        self.log = log
        self.fastpath = fastpath
        self.on_error = on_error
        self._clock = clock
        self._mark_accept = settle_mark(domain, True)
        self._mark_drop = settle_mark(domain, False)
        # True once the mangle POSTROUTING save chain is in place (the runner sets it): an
        # accept then carries its mark with a plain NF_ACCEPT, saved into conntrack there,
        # instead of NF_REPEAT's second FORWARD traversal.
        self.save_in_postrouting = False
        self.stats = EngineStats()
        self._facts = NO_FACTS
        self._facts_at = -1e9  # monotonic time of the last set_facts
        # A bounded full walk for the packet path (the runner sets it): a packet no socket sends
        # is judged on a view at most FRESH_VIEW old, see _fresh_facts.
        self.refresh_view: Callable[[], GuestView] | None = None
        self._refresh_tried = -1e9

    @property
    def facts(self) -> GuestFacts:
        return self._facts

    def set_facts(self, facts: GuestFacts) -> None:
        """The refresher's latest facts (one reference assignment, like the policy)."""
        self._facts = facts
        self._facts_at = time.monotonic()

    def absorb_view(self, view: GuestView) -> GuestFacts:
        """The facts after one more full walk (GuestFacts.updated), now the engine's."""
        facts = self._facts.updated(view)
        self.set_facts(facts)
        return facts

    def _fresh_facts(self, policy: Policy) -> GuestFacts | None:
        """Facts no older than FRESH_VIEW to judge a packet no socket sends, walking now if
        needed; None when none can be had (walks at most once per FRESH_VIEW: a flood of forged
        packets cannot make the gate walk without end). The refresher's view may predate the
        raw or packet socket that sends it: a socket made between two refreshes would
        otherwise be a free pass."""
        if not policy.blocks_anything or self.refresh_view is None:
            return self._facts
        now = time.monotonic()
        if now - self._facts_at <= FRESH_VIEW:
            return self._facts
        if now - self._refresh_tried < FRESH_VIEW:
            return None
        self._refresh_tried = now
        try:
            view = self.refresh_view()
        except Exception as e:  # a busy source or torn memory: no view, the safe verdict
            log.debug("domain %d: no fresh view for an unattributable packet: %s", self.domain, e)
            return None
        facts = self.absorb_view(view)
        return facts if view.complete else None

    def _unattributable(self, policy: Policy, what: str) -> Decision:
        """An outgoing packet no guest socket sends: judged by the raw/packet-socket holders of
        a fresh view; while a block is in force and no fresh complete view can be had, dropped
        (never settled: the next packet is judged again)."""
        facts = self._fresh_facts(policy)
        if facts is None:
            return Decision(
                Verdict.DROP,
                f"unattributable {what}: no fresh view of raw/packet socket holders",
                known=False,
                settle=False,
            )
        return decide_unattributable(policy, facts, what)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        # One reference assignment: a packet sees the old or the new snapshot, never a mix.
        self._policy = policy
        self.cache.clear()

    # --- pure-ish core --------------------------------------------------------------------

    def evaluate(self, payload: bytes, physindev: int, physoutdev: int) -> Evaluation:
        policy = self._policy
        direction = direction_of(physindev, physoutdev, self._vif_indexes)
        parsed = parse(payload)
        if isinstance(parsed, Malformed):
            decision = decide(None, None, policy, f"malformed: {parsed.reason}")
            return Evaluation(decision, AnswerSource.PARSE, direction=direction)
        if direction is None:
            why = f"packet not on a vif of domain {self.domain} (in {physindev}, out {physoutdev})"
            return Evaluation(decide(None, None, policy, why), AnswerSource.PARSE, parsed)
        if parsed.proto == IPProto.ICMPV6 and parsed.icmp_type in ICMPV6_NDP_TYPES:
            # Neighbour discovery is the link itself: dropping it would cut all IPv6.
            decision = Decision(Verdict.ACCEPT, "icmpv6 neighbour/listener discovery", known=False)
            return Evaluation(decision, AnswerSource.PARSE, parsed, direction=direction)
        flow = to_flow(parsed, direction)
        facts = self._facts
        outgoing = direction is Direction.FROM_GUEST
        what = ""  # named only when a packet is judged unattributable (not on every packet)
        if parsed.fragment:
            # conntrack reassembles before FORWARD: a lone fragment here has no header to key on.
            if outgoing:
                decision = self._unattributable(policy, "non-first fragment")
            else:
                decision = decide(None, None, policy, "non-first fragment")
            return Evaluation(decision, AnswerSource.PARSE, parsed, flow, direction)
        if parsed.echo_id >= 0 and (parsed.icmp_type in ECHO_REQUEST_TYPES) != outgoing:
            # An echo request to the guest, or an echo reply from it: the guest kernel's
            # (icmp_echo), no socket's. From the guest it may also be forged (raw socket).
            if outgoing:
                decision = self._unattributable(policy, "echo reply")
            else:
                decision = decide(None, flow, policy, "echo request to the guest kernel")
            return Evaluation(decision, AnswerSource.PARSE, parsed, flow, direction)
        if self.cache.check_generation(self.source.generation()):
            pass  # guest rebooted: the cache was emptied, this lookup goes to the guest
        try:
            if is_connection_request(parsed, direction):
                listener = ListenerKey.of(flow)
                answer = self.cache.get_or_load(
                    flow,
                    self._syn_owner,
                    PACKET_WAIT,
                    key=listener,
                    store_as=lambda o: _syn_key(o, flow, listener),
                )
            else:
                answer = self.cache.get_or_load(flow, self._lookup, PACKET_WAIT)
        except TimeoutError as e:
            flags = parsed.tcp_flags if parsed.embedded is None else 0
            decision = decide_unanswered(flow, policy, facts, f"owner lookup: {e}", flags, outgoing)
            return Evaluation(decision, AnswerSource.TIMEOUT, parsed, flow, direction)
        ownership = answer.ownership
        if (
            outgoing
            and ownership is not None
            and parsed.proto == IPProto.TCP
            and parsed.embedded is None
            and from_listener(ownership)
            and parsed.tcp_flags & _SYN_ACK != _SYN_ACK
        ):
            # A listener sends only SYN-ACKs (syncookies included); anything else from its
            # port is some other sender's, e.g. a raw socket forging the listener's port.
            what = f"tcp from listening port {flow.lport}, not a SYN-ACK"
            ownership = None
        if ownership is None and outgoing:
            kernel = kernel_sent(parsed)
            if kernel:
                decision = decide(None, flow, policy, kernel)
            elif (opening := opens_a_flow(parsed)) and policy.blocks_anything:
                # Its socket is gone by the time its turn came (connect() or sendto(), then
                # close(): a flood does it by the thousand while the queue is long; the red
                # team's send-close probes got 2,000 of 2,000 datagrams out before) or it never
                # had one (a raw socket). No one can be named, and the flow is nobody's:
                # dropped while a block is in force, unsettled.
                decision = Decision(
                    Verdict.DROP,
                    f"{opening} of no guest socket (closed before its verdict, or forged)",
                    known=False,
                    settle=False,
                )
            else:
                what = what or f"{proto_label(parsed.proto)} packet"
                decision = self._unattributable(policy, what)
            return Evaluation(decision, answer.source, parsed, flow, direction, answer.ownership)
        why = "icmp error, no socket for the embedded flow" if parsed.is_icmp_error else ""
        if not why and ownership is None and self.degraded:
            why = "no such socket in the last walk; socket hash lookups off"
        decision = decide(ownership, flow, policy, why, facts)
        return Evaluation(decision, answer.source, parsed, flow, direction, ownership)

    def _lookup(self, flow: Flow) -> Ownership | None:
        return self._attempts(self.source.lookup, flow)

    def _syn_owner(self, flow: Flow) -> Ownership | None:
        """Who receives an incoming SYN, the way the guest kernel decides it.

        tcp_v4_rcv/tcp_v6_rcv look the 4-tuple up in ehash first, then the listeners. A SYN
        that finds no connection (the normal case) or a request sock (a retransmitted SYN) is
        the listener's: tcp_conn_request creates a request sock under it. A SYN that finds a
        TIME_WAIT sock is handed to the listener too (tcp_timewait_state_process ->
        TCP_TW_SYN; if the SYN is not acceptable the TIME_WAIT sock only ACKs it, no
        connection is made). So the answer depends on (proto, local address, local port) only
        and is cached under that ListenerKey: one lookup serves every later connection
        attempt to that service, whatever the client's address and port. Sound because:
        the cache holds ownership, not verdicts, and is dropped on a policy or generation
        change like every entry; the key is the SYN's own destination address, so a wildcard
        listener (0.0.0.0, ::) is found for the address that was asked; the entry lives the
        cache's listener_ttl (1 s), so a port taken over by another process's listener (or a
        more specific one bound beside it) is seen within that, sooner than the refresher's
        blocked-port sets; an answer without owners (no listener) lives the negative TTL.
        A SYN that finds an established or SYN_SENT sock (a simultaneous open, an RFC 5961
        challenge ACK) is that socket's and is cached under its 5-tuple as before. Known
        limit, as in the uncached lookup: members of an SO_REUSEPORT group are not told apart
        (the kernel picks one per 4-tuple).
        """
        ownership = self._lookup(flow)
        if ownership is not None and ownership.via == Via.TIME_WAIT:
            finder = getattr(self.source, "lookup_listener", None)
            listener = self._attempts(finder, flow) if callable(finder) else None
            if listener is not None:
                return Ownership(
                    listener.owners,
                    listener.sk_uid,
                    listener.state,
                    Via.TIME_WAIT_LISTENER,
                    listener.sock_addr,
                )
        return ownership

    @staticmethod
    def _attempts(lookup: Callable[[Flow], Ownership | None], flow: Flow) -> Ownership | None:
        last: Exception | None = None
        for _ in range(LOOKUP_ATTEMPTS):
            try:
                return lookup(flow)
            except Exception as e:  # guest memory is hostile and live: retry once
                last = e
        assert last is not None
        raise last

    # --- the callback -------------------------------------------------------------------

    def handle(self, pkt: QueuedPacket) -> None:
        """Give `pkt` exactly one verdict, whatever happens."""
        start = self._clock()
        ev: Evaluation
        try:
            ev = self.evaluate(pkt.get_payload(), pkt.physindev, pkt.physoutdev)
        except Exception as e:
            # An error an attacker could provoke must not open the gate for a blocked owner.
            policy = self._policy
            verdict = self.on_error or (Verdict.DROP if policy.blocks_anything else policy.unknown)
            ev = Evaluation(
                Decision(verdict, f"internal error: {type(e).__name__}: {e}", known=False),
                AnswerSource.ERROR,
            )
            self.stats.errors += 1
        settled = False
        try:
            settled = self._apply(pkt, ev)
        except Exception:
            self.stats.verdict_failures += 1
            # The kernel is still owed a verdict unless the failing call gave it (the binding
            # then refuses a second one): answer plainly, never leave the packet queued.
            try:
                if ev.decision.verdict is Verdict.ACCEPT:
                    pkt.accept()
                else:
                    pkt.drop()
            except Exception:
                pass
        elapsed = self._clock() - start
        self._account(ev, settled, elapsed)
        if self.log is not None:
            try:
                self.log.record(
                    self._log_entry(pkt, ev, settled, elapsed),
                    always=ev.decision.verdict is Verdict.DROP or ev.source is AnswerSource.ERROR,
                )
            except Exception:
                self.stats.errors += 1

    def _apply(self, pkt: QueuedPacket, ev: Evaluation) -> bool:
        accept = ev.decision.verdict is Verdict.ACCEPT
        mark = 0
        try:
            mark = pkt.get_mark()
        except Exception:
            mark = 0
        # Settle only answers about a known owner; a packet already carrying our mark came back
        # (rules missing?): answer it directly instead of repeating it forever. DROP always
        # repeats: FORWARD saves the mark into an already confirmed (unsettled) flow's entry.
        settle = ev.decision.known and ev.decision.settle
        if self.fastpath and settle and not (mark & MARK_MASK):
            pkt.set_mark((mark & ~MARK_MASK) | (self._mark_accept if accept else self._mark_drop))
            if accept and self.save_in_postrouting:
                pkt.accept()
            else:
                pkt.repeat()
            return True
        if accept:
            pkt.accept()
        else:
            pkt.drop()
        return False

    def _account(self, ev: Evaluation, settled: bool, elapsed: int) -> None:
        s = self.stats
        s.packets += 1
        if ev.decision.verdict is Verdict.ACCEPT:
            s.accepted += 1
        else:
            s.dropped += 1
        if settled:
            s.settled += 1
        s.by_source[ev.source] = s.by_source.get(ev.source, 0) + 1
        key = (ev.decision.verdict.value, ev.source.value)
        s.by_verdict_source[key] = s.by_verdict_source.get(key, 0) + 1
        s.latency_counts[bisect.bisect_left(LATENCY_BOUNDS_NS, elapsed)] += 1
        s.latency_ns_total += elapsed
        s.latency_ns_max = max(s.latency_ns_max, elapsed)

    def _log_entry(
        self, pkt: QueuedPacket, ev: Evaluation, settled: bool, elapsed: int
    ) -> dict[str, Any]:
        p = ev.parsed
        owner = ev.decision.owner
        vif_index = pkt.physindev if ev.direction is Direction.FROM_GUEST else pkt.physoutdev
        entry: dict[str, Any] = {
            "time": round(time.time(), 6),
            "domain": self.domain,
            "vif": self.vifs.get(vif_index, ""),
            "direction": ev.direction.value if ev.direction else "",
            "proto": proto_label(p.proto) if p else "",
            "src": str(p.src) if p else "",
            "sport": p.sport if p else 0,
            "dst": str(p.dst) if p else "",
            "dport": p.dport if p else 0,
            "pid": owner.pid if owner else None,
            "uid": owner.uid if owner else None,
            "comm": owner.comm if owner else None,
            "verdict": ev.decision.verdict.value,
            "reason": ev.decision.reason,
            "source": ev.source,
            "latency_us": round(elapsed / 1000, 1),
            "settled": settled,
        }
        if ev.ownership is not None:
            entry["owners"] = [
                {"pid": o.pid, "uid": o.uid, "euid": o.euid, "comm": o.comm}
                for o in ev.ownership.owners
            ]
            entry["sk_uid"] = ev.ownership.sk_uid
            entry["state"] = ev.ownership.state
            entry["via"] = ev.ownership.via
        if p is not None and p.icmp_type >= 0:
            entry["icmp_type"] = p.icmp_type
        return entry


def _syn_key(ownership: Ownership | None, flow: Flow, listener: ListenerKey) -> CacheKey:
    """Where an incoming SYN's answer is cached: under the listener when it is the listener's
    (or there is none: the short negative entry), else under the connection's 5-tuple."""
    if ownership is None or ownership.via in LISTENER_VIAS:
        return listener
    return flow
