"""The gate process: sets up the kernel side, serves the queue(s), cleans up on exit.

One process may serve several domains (all in one network namespace), each with its own queue
number, chains, sets, control socket and threads: a packet thread per domain (one domain's flood
does not starve another's queue), a control thread per domain (status and block answer while the
packet path is busy; it never takes the owner source's lock) and a refresher thread (the periodic
guest walk that feeds the kernel-side sets and the policy's guest facts, behind the owner
source's lock, which the packet path waits on for at most engine.PACKET_WAIT). Poll-mode walks
run in the main thread.

Stopping is not releasing: by default a stopping gate leaves its chains, sets and queue rule in
the kernel (unsettled flows then follow --queue-bypass, blocked owners' known ports and flows
stay dropped) until a gate binds again (it adopts them in place) or `xfgate cleanup`;
``release_on_exit`` removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import logging
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xfgate.config import DomainConfig
from xfgate.errors import (
    ConfigError,
    GuestNotRunning,
    PrerequisiteError,
    QueueError,
    XfgateError,
)
from xfgate.flow import Flow, GuestSocket, GuestView, Owner, Ownership, OwnerSource
from xfgate.hypervisor.resolve import resolve_domain
from xfgate.inet import IPProto, proto_label
from xfgate.verdict import bridge, control
from xfgate.verdict.blocksets import (
    BlockEntry,
    blocked_entries,
    port_entries,
    ports_text,
    socket_entries,
)
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import (
    PACKET_WAIT,
    CreatorShortcut,
    Engine,
    LockedOwnerSource,
    QueuedPacket,
)
from xfgate.verdict.fairness import CpuShare, cpu_and_wait
from xfgate.verdict.fastpath import (
    Firewall,
    GateLayout,
    check_prerequisites,
    make_backend,
    poll_rules,
)
from xfgate.verdict.listeners import (
    CARRY_SECONDS,
    GRANT_TTL,
    KEEP_INTERVAL,
    ListenerGrant,
    carried_grants,
    keeper_facts,
    listener_grants,
    renewable,
)
from xfgate.verdict.log import VerdictLog
from xfgate.verdict.netns import enter_netns, ifindex
from xfgate.verdict.options import GateMode, GateOptions
from xfgate.verdict.policy import GuestFacts, Policy, Verdict, blocked_ports, socket_blocked
from xfgate.vmi.kernel_constants import IPPROTO_MPTCP
from xfgate.vmi.monitor import qemu_pid

if TYPE_CHECKING:
    from xfgate.vmi.profile import Profile

log = logging.getLogger(__name__)
DEFAULT_QUEUE_BASE = 100  # queue number = base + domain id unless --queue-num is given
IDLE_TICK = 0.5
# Control requests answered on a thread of their own: `ps` may take its whole walk bound (5 s);
# status/block/unblock must not wait behind it.
SLOW_OPS = frozenset({"ps"})
# How often the blocked sets are rewritten whole rather than by differences (BlockedSetsWriter).
# The refresher follows each view's delta (flow.ViewDelta) to know which sockets to judge; at
# least this often it compares the whole view with its cache instead (a pass over every socket
# at C speed: a crowd's 20,006 in ~2 ms), counting and repairing what the deltas missed.
ENTRIES_CHECK_SECONDS = 120.0
RESWAP_SECONDS = 60.0


# Builds a domain's owner source from its configuration and the gate's options.
OwnerSourceFactory = Callable[[DomainConfig, GateOptions], OwnerSource]


class IntrospectionSources:
    """The gate's owner sources: the guest kernel's memory, read by introspection. Domains that
    name the same kernel share one profile object: a Debian 6.1 profile is ~30 MB of Python
    objects (struct layouts and ~90k symbols), loaded once per kernel, not once per domain
    (issue 10: memory per domain). A profile is read-only once loaded (its struct layouts are
    decoded on first use, the same for every reader). A domain that names no kernel gets its
    profile from its own memory, unshared."""

    def __init__(self) -> None:
        self._profiles: dict[tuple[str, ...], Profile] = {}

    def profile(self, domain: DomainConfig, options: GateOptions) -> Profile:
        from xfgate.vmi.cli import load_domain_profile

        k = domain.kernel
        key = (options.profile or "", str(options.cache_dir), k.assets, k.package, k.release)
        if not (options.profile or k.assets or k.package or k.release):
            return load_domain_profile(domain, options.profile, options.cache_dir)
        found = self._profiles.get(key)
        if found is None:
            found = load_domain_profile(domain, options.profile, options.cache_dir)
            self._profiles[key] = found
        else:
            log.info("domain %d: sharing the loaded profile of kernel %s", domain.id, found.release)
        return found

    def __call__(self, domain: DomainConfig, options: GateOptions) -> OwnerSource:
        from xfgate.vmi.introspect import GuestIntrospector
        from xfgate.vmi.liveness import require_running

        require_running(domain)  # a dead VM's RAM file would answer with stale owners
        return GuestIntrospector(domain, self.profile(domain, options))


def with_vifs(domain: DomainConfig) -> DomainConfig:
    """A QEMU-process domain without `vifs` gets the taps its QEMU reports."""
    if domain.vifs or domain.memory.backend != "qemu-process":
        return domain
    from xfgate.vmi.monitor import domain_vifs

    vifs = domain_vifs(domain)
    log.info("domain %d: vifs from QEMU: %s", domain.id, ", ".join(vifs))
    return replace(domain, vifs=vifs)


def queue_counters() -> dict[int, dict[str, int]]:
    """Per queue: packets waiting, dropped by the kernel (queue full) and by netlink (ENOBUFS)."""
    out: dict[int, dict[str, int]] = {}
    try:
        text = Path("/proc/net/netfilter/nfnetlink_queue").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 7:
            out[int(f[0])] = {
                "waiting": int(f[2]),
                "queue_dropped": int(f[5]),
                "user_dropped": int(f[6]),
            }
    return out


class Refresher(threading.Thread):
    """Walks the guest every few seconds: keeps the engine's guest facts (tasks, lineage, raw
    holders) and the domain's kernel sets current, so known ports of blocked owners stay
    dropped in the kernel (also after the gate stops). A failed walk changes nothing; an
    incomplete one only adds (the sets are the union with the previous ones) and makes the
    domain ``degraded`` until a complete walk."""

    def __init__(
        self,
        domain: int,
        source: LockedOwnerSource,
        engine: Engine,
        apply: Callable[[set[BlockEntry]], None],
        interval: float,
        listeners: ListenerSets | None = None,
        reset_settled: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"xfgate-refresh-{domain}", daemon=True)
        self.domain = domain
        self._source = source
        self._engine = engine
        self._apply = apply
        # Called when a connection the last view showed unblocked now belongs to a blocked
        # owner (its holder dropped to a blocked uid, exec'd a blocked program, or handed the
        # fd on): its flow may be settled as accepted, and the settled-accept rule comes
        # before the sets, so the domain's settled flows are re-decided.
        self._reset_settled = reset_settled
        self.settled_resets = 0
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.entries: set[BlockEntry] | None = None
        self.walks = 0
        self.gone = ""  # why the domain is not running any more (its QEMU exited): stopped
        self.last_error = ""
        self.degraded = ""
        self.last_walk_ms = 0.0
        # Granted listeners (``listeners``): computed by a walk under `_grant_policy`, renewed
        # by keep_listeners; None: the gate grants none (no fast path).
        self._listeners = listeners
        self._grant_lock = threading.Lock()
        self._grants: set[ListenerGrant] = set()
        self._grant_policy: Policy | None = None
        self._granted: set[BlockEntry] = set()  # what the kernel set holds (or may, until TTL)
        self._grants_at = 0.0  # monotonic time of the complete view the grants come from
        self.grant_renewals = 0
        self.grant_refusals = 0
        self.keep_rounds = 0  # keep_listeners calls that looked the grants up
        self.grants_carried = 0  # incomplete views that carried the last complete view's grants
        self.grant_unanswered = 0  # renewals whose lookup did not answer (left to lapse)
        self._misses: dict[BlockEntry, int] = {}  # consecutive unanswered renewals per entry
        self.keeper = ListenerKeeper(self) if listeners is not None else None
        self.unchanged = 0  # refreshes that found nothing changed (no facts or sets recomputed)
        self._last_view: GuestView | None = None
        self._last_policy: Policy | None = None
        # id(GuestSocket) -> (the socket, its entries if blocked): the cache holds the sockets,
        # so no other object can take their ids while they are in it.
        self._entry_cache: dict[int, tuple[GuestSocket, tuple[BlockEntry, ...]]] = {}
        self._entry_blocked: dict[int, tuple[BlockEntry, ...]] = {}  # the blocked ones
        # The cached sockets that can take a SYN (_takes_syn): all that listener grants look
        # at, kept with the cache so that a grant recompute does not pass over every socket
        # (a crowd's 20,000); None when the last _entries did not keep the cache.
        self._entry_syn: dict[int, GuestSocket] | None = None
        # The connected cached sockets by local port (what _reset_if_owners_became_blocked
        # looks at), and what the last _entries added (ids) and removed (the objects, kept
        # alive so their ids stay theirs): None when the last _entries did not keep the cache.
        self._entry_ports: dict[int, dict[int, GuestSocket]] = {}
        self._entry_added: set[int] | None = None
        self._entry_removed: list[GuestSocket] = []
        # The facts the cache holds the sockets of, and those it held before the last _entries
        # (the port index answers for "the view before" only when that is the engine's facts
        # before: no other view absorbed in between).
        self._cache_facts: GuestFacts | None = None
        self._cache_prev: GuestFacts | None = None
        # The serial (GuestView.serial) of the view the cache holds the sockets of: a view whose
        # delta starts there is followed at the cost of its delta (0: none; compare whole).
        self._entries_serial = 0
        self._entries_checked_at = time.monotonic()
        self.entries_by_delta = 0  # _entries that followed the view's delta
        self.entries_rechecked = 0  # _entries that compared the whole view instead (a check)
        self.entries_disagreements = 0  # ... and found what the delta did not say (repaired)
        self.grant_recomputes = 0  # refreshes that recomputed the listener grants
        self.sockets_judged = 0  # sockets _entries judged afresh (new objects of the views)
        self._entries_policy: Policy | None = None
        # Set by _entries: whether the last facts added or removed a socket that can take a
        # SYN (unconnected TCP/MPTCP), and the facts' tasks then: else the grants stand.
        self._listeners_moved = True
        self._grant_tasks: object = None
        self._watch: Callable[[Owner], bool] = lambda _owner: False
        self._watch_for: Policy | None = None
        self._frozen_walks = 0  # full walks seen (_freeze_after_full_walk)

    def trigger(self) -> None:
        self._wake.set()

    def wait_keep(self, seconds: float) -> None:
        """The keeper's pause: ends early when the refresher stops."""
        self._stop.wait(seconds)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def refresh_once(self, walk: bool = False) -> None:
        """One walk (skipped when nothing is blocked, unless `walk`) and a set update."""
        policy = self._engine.policy
        start = time.monotonic()
        if policy.blocks_anything or walk:
            refresh = getattr(self._source, "refresh", None)  # a plain source: full views
            if callable(refresh):
                view: GuestView = refresh(self._watch_fn(policy))
            else:
                view = self._source.view()
            self.last_walk_ms = round((time.monotonic() - start) * 1000, 2)
            self._freeze_after_full_walk()
            if view.complete and view is self._last_view and policy is self._last_policy:
                # Nothing changed in the guest (the introspector handed back the same view) nor
                # in the policy: the facts and sets stand as they are.
                self.unchanged += 1
                self.walks += 1
                return
            before = self._engine.facts
            facts = self._engine.absorb_view(view)
            entries = self._entries(facts, policy, view)
            self._reset_if_owners_became_blocked(entries, before, facts, policy)
            if (
                self._listeners_moved
                or policy.blocks_processes
                or policy is not self._grant_policy
                or facts.tasks is not self._grant_tasks
                or not facts.complete
            ):
                self._set_grants(self._grants_of(facts, policy), policy)
                self._grant_tasks = facts.tasks if facts.complete else None
            else:  # a complete view with the same listeners and tasks bears the grants out
                self._grants_at = time.monotonic()
            self._last_view, self._last_policy = view, policy
            if view.complete:
                self.degraded = ""
            else:
                entries |= self.entries or set()
                why = "; ".join(view.problems[:3]) or "no reason given"
                self.degraded = f"incomplete walk (sets only grow until a complete one): {why}"
                log.warning("domain %d: degraded: %s", self.domain, self.degraded)
        else:
            entries = set()
        self.walks += 1
        if entries != self.entries:
            self._apply(entries)
            self.entries = entries

    def _freeze_after_full_walk(self) -> None:
        """After a full walk (the gate's first, a reboot's), the garbage collected and what
        lives on frozen (gc.freeze): a crowded guest's walk state is ~100,000 long-lived
        objects, and a collection of the oldest generation scanned them all (355 ms, measured
        on the crowd, at a random refresh). Acyclic data still frees by reference counting."""
        cc = getattr(getattr(self._source, "inner", None), "crosscheck", None)
        walks = getattr(cc, "full_walks", None)
        if isinstance(walks, int) and walks != self._frozen_walks:
            self._frozen_walks = walks
            gc.collect()
            gc.freeze()

    def _watch_fn(self, policy: Policy) -> Callable[[Owner], bool]:
        """The blocked owners (their sockets are read afresh on every refresh). The same
        function while the policy is the same and names no pid (then an owner's answer
        depends on the owner alone: the introspector may remember it per task); with a pid
        rule it depends on the facts' lineage, so a new one each time."""
        if policy.block_pids or self._watch_for is not policy:
            engine = self._engine

            def watch(owner: Owner) -> bool:
                return policy.owner_blocked(owner, engine.facts) is not None

            self._watch, self._watch_for = watch, policy
        return self._watch

    def _reset_if_owners_became_blocked(
        self, entries: set[BlockEntry], before: GuestFacts, facts: GuestFacts, policy: Policy
    ) -> None:
        """Settled flows decided again when a new flow entry is a connection the last view
        showed unblocked, or one held by a thread group the last view showed and did not
        block (it became blocked: a setuid, an exec; its connection may predate the view, as
        quiet refreshes do not re-read an unblocked task's fd table until a slice does)."""
        new_flows = {e for e in entries - (self.entries or set()) if e.is_flow}
        if not new_flows or self._reset_settled is None or self.entries is None:
            return
        # The same connection (its sock, its 4-tuple) seen before and blocked now. Not its set
        # entry alone, which has no remote port: a blocked owner's flood reusing the local port
        # of a connection to the same peer reset every settled flow of the domain, the good
        # service's included, sending them into the queue behind the flood (measured: 91 of
        # 1,200 httperf connections timed out after one such reset). Only sockets on a port of
        # a new flow entry can give one (the attacker's new flows appear on nearly every
        # refresh: the entries of all 20,000 sockets of a crowd were computed each time).
        ports = {e.port for e in new_flows}
        added = self._entry_added
        if (
            added is not None
            and self._cache_prev is before
            and len(self._entry_cache) == len(facts.sockets)
        ):
            # The cache holds the facts' sockets: those on these ports from its port index,
            # the view before's being them but the ones just added, plus the ones removed.
            on_ports = [s for p in ports for s in self._entry_ports.get(p, {}).values()]
            was = {_connection(s) for s in on_ports if id(s) not in added}
            was |= {_connection(s) for s in self._entry_removed if s.rport and s.lport in ports}
        else:
            was = {_connection(s) for s in before.sockets if s.rport and s.lport in ports}
            on_ports = [s for s in facts.sockets if s.rport and s.lport in ports]
        changed = {
            e
            for s in on_ports
            if _connection(s) in was
            for e in socket_entries(s)
            if e in new_flows and socket_blocked(s, policy, facts)
        }
        if not changed:
            held = facts.sockets if policy.blocks_processes else self._blocked_sockets()
            held = [s for s in held if s.rport and s.lport in ports]
            pids = {o.pid for s in held for o in s.owners}
            tasks_was = {t.pid: t for t in before.tasks if t.pid in pids}
            now = {t.pid: t for t in facts.tasks if t.pid in tasks_was}
            free = {  # shown unblocked by the last view, blocked now: it became blocked
                pid
                for pid, t in tasks_was.items()
                if policy.owner_blocked(t, before) is None
                and pid in now
                and policy.owner_blocked(now[pid], facts) is not None
            }
            for s in held:
                if any(o.pid in free for o in s.owners):
                    changed |= new_flows & set(socket_entries(s))
        if changed:
            log.warning(
                "domain %d: %d connection(s) seen unblocked now belong to a blocked owner "
                "(e.g. %s): the domain's settled flows are decided again",
                self.domain,
                len(changed),
                min(str(e) for e in changed),
            )
            self.settled_resets += 1
            self._reset_settled()

    def _blocked_sockets(self) -> list[GuestSocket]:
        """The sockets the last _entries judged blocked (its cache holds them)."""
        return [self._entry_cache[key][0] for key in self._entry_blocked]

    def _entries(self, facts: GuestFacts, policy: Policy, view: GuestView) -> set[BlockEntry]:
        """blocked_entries(facts.sockets, policy, facts), each socket judged once while the
        policy is the same object and names no process (then a socket's decision depends on
        its owners and sk_uid only, not on the facts' lineage): an incremental view hands back
        the same GuestSocket objects for what did not change."""
        self._listeners_moved = True
        serial, self._entries_serial, self._entry_added = self._entries_serial, 0, None
        prev_facts, self._cache_facts, self._cache_prev = self._cache_facts, None, None
        if policy.blocks_processes or policy is not self._entries_policy:
            self._entry_cache, self._entry_blocked, self._entry_syn = {}, {}, {}
            self._entry_ports, serial, prev_facts = {}, 0, None
            self._entries_policy = policy
            if policy.blocks_processes:
                self._entry_syn = None
                return blocked_entries(facts.sockets, policy, facts)
        out = {e for proto, port in policy.block_ports for e in port_entries(proto, port)}
        cache, blocked, ports = self._entry_cache, self._entry_blocked, self._entry_ports
        syn = self._entry_syn if self._entry_syn is not None else {}
        gone, fresh = self._changed_sockets(facts, view, serial)
        moved = False
        removed: list[GuestSocket] = []
        for key in gone:
            s = cache.pop(key)[0]
            removed.append(s)
            moved = moved or _takes_syn(s)
            blocked.pop(key, None)
            syn.pop(key, None)
            on_port = ports.get(s.lport)
            if on_port is not None:
                on_port.pop(key, None)
                if not on_port:
                    del ports[s.lport]
        self.sockets_judged += len(fresh)
        added: set[int] = set()
        for s in fresh:
            key = id(s)
            found = tuple(socket_entries(s)) if socket_blocked(s, policy, facts) else ()
            cache[key] = (s, found)
            added.add(key)
            if found:
                blocked[key] = found
            if s.rport:
                ports.setdefault(s.lport, {})[key] = s
            if _takes_syn(s):  # after the cache: the two hold the same keys whatever raises
                moved = True
                syn[key] = s
        for found in blocked.values():
            out.update(found)
        self._listeners_moved = moved
        self._entry_syn = syn
        self._entry_added, self._entry_removed = added, removed
        self._cache_facts, self._cache_prev = facts, prev_facts
        if view.complete and facts.sockets is view.sockets:
            self._entries_serial = view.serial
        return out

    def _changed_sockets(
        self, facts: GuestFacts, view: GuestView, serial: int
    ) -> tuple[list[int], list[GuestSocket]]:
        """The cache's keys no longer in the facts and the facts' sockets not in the cache:
        from the view's delta when it starts at the view the cache holds (`serial`), at the
        cost of what changed; else (and every ENTRIES_CHECK_SECONDS, as a check of the
        deltas: a difference is counted, logged and repaired) by comparing every socket's id
        with the cache's (a crowd's 20,000, at C speed)."""
        cache = self._entry_cache
        delta = view.delta
        follow = (
            serial != 0
            and delta is not None
            and delta.base == serial
            and view.complete
            and facts.sockets is view.sockets
        )
        now_t = time.monotonic()
        if follow and now_t - self._entries_checked_at < ENTRIES_CHECK_SECONDS:
            assert delta is not None
            self.entries_by_delta += 1
            gone = [id(s) for s in delta.removed if cache.get(id(s), (None,))[0] is s]
            return gone, [s for s in delta.added if id(s) not in cache]
        now = dict(zip(map(id, facts.sockets), facts.sockets, strict=True))  # at C speed
        gone_keys = cache.keys() - now.keys()
        fresh = [now[key] for key in now.keys() - cache.keys()]
        if follow:
            assert delta is not None
            self._entries_checked_at = now_t
            self.entries_rechecked += 1
            said_gone = {id(s) for s in delta.removed if cache.get(id(s), (None,))[0] is s}
            said_new = {id(s) for s in delta.added if id(s) not in cache}
            if said_gone != gone_keys or said_new != {id(s) for s in fresh}:
                self.entries_disagreements += 1
                log.warning(
                    "domain %d: the view's delta disagrees with the whole view (%d/%d sockets "
                    "gone, %d/%d new): repaired from the whole view",
                    self.domain,
                    len(said_gone),
                    len(gone_keys),
                    len(said_new),
                    len(fresh),
                )
        return list(gone_keys), fresh

    def _syn_sockets(self, facts: GuestFacts) -> Collection[GuestSocket]:
        """The sockets listener grants look at: the cache's SYN-taking ones when the last
        _entries kept the cache for these facts, else every socket of the facts."""
        if self._entry_syn is None or len(self._entry_cache) != len(facts.sockets):
            return facts.sockets
        return tuple(self._entry_syn.values())

    @property
    def granted(self) -> set[BlockEntry]:
        return set(self._granted)

    def keeper_work(self) -> dict[str, int]:
        """The keeper's rounds and what its renewals cost the kernel link (`status`)."""
        link = self._listeners.link_stats() if self._listeners is not None else {}
        return {"rounds": self.keep_rounds, **{f"link_{k}": v for k, v in link.items()}}

    def _grants_of(self, facts: GuestFacts, policy: Policy) -> set[ListenerGrant]:
        """The grants after a view: a complete one's own; an incomplete one carries what it
        bears out of the last complete view's grants (same policy), for CARRY_SECONDS."""
        now = time.monotonic()
        self.grant_recomputes += 1
        sockets = self._syn_sockets(facts)
        if facts.complete:
            self._grants_at = now
            return listener_grants(sockets, policy, facts)
        with self._grant_lock:
            previous = self._grants if self._grant_policy is policy else set()
        if not previous or now - self._grants_at > CARRY_SECONDS:
            return set()
        self.grants_carried += 1
        return carried_grants(previous, sockets, policy, facts)

    def _set_grants(self, grants: set[ListenerGrant], policy: Policy) -> None:
        with self._grant_lock:
            self._grants = grants
            self._grant_policy = policy

    def revoke_listeners(self) -> None:
        """Forget every grant and empty the kernel sets (before a policy change settles)."""
        with self._grant_lock:
            self._grants = set()
            self._grant_policy = None
            self._granted = set()
            if self._listeners is not None:
                self._listeners.revoke()

    def keep_listeners(self) -> None:
        """Renew the grants whose listener the guest still shows unchanged and good; delete
        the others at once (see ``listeners``). A lookup that fails or times out renews
        nothing: the entry lapses within GRANT_TTL and its SYNs go to the queue again."""
        if self._listeners is None:
            return
        with self._grant_lock:
            policy = self._engine.policy
            grants = self._grants if self._grant_policy is policy else set()
            facts = keeper_facts(self._engine.facts, time.monotonic() - self._grants_at)
            answers: dict[Flow, Ownership | None] = {}
            failed: set[Flow] = set()
            keep: set[BlockEntry] = set()
            unanswered: set[BlockEntry] = set()
            self.keep_rounds += 1
            for grant in sorted(grants, key=lambda g: g.entry):
                if grant.probe not in answers:
                    try:
                        answers[grant.probe] = self._source.lookup_listener(grant.probe)
                    except Exception as e:  # busy source, torn memory: not renewed
                        log.debug("domain %d: listener %s not renewed: %s", self.domain, grant, e)
                        answers[grant.probe] = None
                        failed.add(grant.probe)
                if grant.probe in failed:
                    unanswered.add(grant.entry)
                elif renewable(grant, answers[grant.probe], policy, facts):
                    keep.add(grant.entry)
            if self._stop.is_set():  # stopping: revoke_listeners follows, renew nothing
                return
            # A lookup that did not answer (the source busy with the packet path under a
            # flood) renews nothing and deletes nothing: the entry lapses within GRANT_TTL
            # unless the next round renews it. Deleting it at once, as a refusal does, sent
            # the good service's connections into the flood's queue for a busy moment.
            for entry in unanswered:
                self._misses[entry] = self._misses.get(entry, 0) + 1
            lapsed = {e for e in unanswered if self._misses[e] * KEEP_INTERVAL >= GRANT_TTL}
            pending = (unanswered & self._granted) - lapsed
            gone = self._granted - keep - pending
            if keep or gone - lapsed:
                self._listeners.renew(keep, gone - lapsed)
            self._misses = {e: n for e, n in self._misses.items() if e in pending}
            self.grant_renewals += len(keep)
            self.grant_refusals += len({g.entry for g in grants} - keep - unanswered)
            self.grant_unanswered += len(unanswered)
            self._granted = keep | pending

    def start(self) -> None:
        super().start()
        if self.keeper is not None:
            self.keeper.start()

    def run(self) -> None:
        # The gate's first walk (refresh_once before start) is the first one: the next in one
        # interval, unless triggered.
        next_walk = time.monotonic() + self._interval if self.walks else 0.0
        while not self._stop.is_set():
            if self._wake.is_set() or time.monotonic() >= next_walk:
                self._wake.clear()
                try:
                    self.refresh_once()
                    self.last_error = ""
                except GuestNotRunning as e:  # the gate lets go of the domain (_let_go_gone)
                    self.gone = self.last_error = str(e)
                    log.error("domain %d: %s", self.domain, e)
                    return
                except Exception as e:  # a torn walk must not end the refresher, nor a set
                    self.last_error = f"{type(e).__name__}: {e}"
                    log.warning("domain %d: refresh failed: %s", self.domain, e)
                next_walk = time.monotonic() + self._interval
            self._wake.wait(max(0.0, next_walk - time.monotonic()))

    def stopped(self) -> bool:
        return self._stop.is_set()


class ListenerKeeper(threading.Thread):
    """Renews the refresher's grants every KEEP_INTERVAL on its own thread. In the refresher's
    loop a renewal waited for the walk before it: under a flood (the packet thread holding the
    GIL, the walk reading the flood's tables afresh) a refresh took over a second, the
    one-second grants lapsed, and a good service's new connections queued behind the flood
    (measured: renewals stalled 0.7-1.3 s at each walk, the queue 500-2,000 packets deep)."""

    def __init__(self, refresher: Refresher) -> None:
        super().__init__(name=f"xfgate-keeper-{refresher.domain}", daemon=True)
        self._refresher = refresher

    def run(self) -> None:
        r = self._refresher
        while not r.stopped():
            try:
                r.keep_listeners()
            except Exception as e:  # e.g. ipset refused: the grants lapse on their own
                log.warning("domain %d: granted listeners not renewed: %s", r.domain, e)
            r.wait_keep(KEEP_INTERVAL)


def _connection(s: GuestSocket) -> tuple[int, object, int, object, int, int]:
    """One connection's identity across views: its sock and its 4-tuple."""
    return (s.proto, s.local, s.lport, s.remote, s.rport, s.sock_addr)


def _takes_syn(s: GuestSocket) -> bool:
    """A socket listener_grants looks at: unconnected TCP or MPTCP (a listener, or a bound
    socket that may listen)."""
    return s.proto in (IPProto.TCP, IPPROTO_MPTCP) and not s.rport


class BlockedSetsWriter:
    """The refresher's writes of a domain's blocked sets: ``Firewall.set_blocked`` with what
    this gate put in them, so that a refresh sends only the differences (one send over a kept
    link); every RESWAP_SECONDS (at the next change) the sets are rewritten whole (staging
    set + swap), which repairs a set changed behind the gate's back."""

    def __init__(self, fw: Firewall, domain: int) -> None:
        self._fw = fw
        self._domain = domain
        self.applied: dict[str, frozenset[BlockEntry]] = {}
        self._whole_at = 0.0

    def __call__(self, entries: set[BlockEntry]) -> None:
        now = time.monotonic()
        if now - self._whole_at >= RESWAP_SECONDS:
            self.applied.clear()
            self._whole_at = now
        self._fw.set_blocked(self._domain, entries, self.applied)


def _no_stats() -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class ListenerSets:
    """How the refresher reaches the domain's granted-listener sets."""

    renew: Callable[[set[BlockEntry], set[BlockEntry]], None]
    revoke: Callable[[], None]
    # What the renewals cost the kernel link (sends, netlink requests, ...) for `status`.
    stats: Callable[[], dict[str, int]] = _no_stats

    def link_stats(self) -> dict[str, int]:
        return self.stats()


class ServeThread(threading.Thread):
    """Calls `serve` whenever `fd` is readable, until stopped: one domain's packet queue or
    control socket, on its own thread. It sleeps in select() until `fd` or its own wake pipe is
    readable, never on a timeout: an idle gate's threads do not wake (at rest on the crowd the
    0.5 s ticks of two threads per domain were ~0.1 % of a core)."""

    def __init__(
        self,
        name: str,
        fd: int,
        serve: Callable[[], None],
        after: Callable[[], None] | None = None,
    ) -> None:
        """`after`: called on this thread after each `serve` (the packet thread's CpuShare)."""
        super().__init__(name=name, daemon=True)
        self._fd = fd
        self._serve = serve
        self._after = after
        self._stop_event = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._pipe_lock = threading.Lock()  # stop() never writes to a closed (reused) fd
        self._pipe_open = True
        self.errors = 0

    def wait_stop(self, seconds: float) -> bool:
        """Sleep up to `seconds` on this thread; True: told to stop meanwhile."""
        return self._stop_event.wait(seconds)

    def stop(self) -> None:
        self._stop_event.set()
        with self._pipe_lock:
            if self._pipe_open:
                os.write(self._wake_w, b"!")  # one byte a stop: the pipe never fills
                if self.ident is None:  # never started: run() will not close it
                    self._close_pipe()

    def _close_pipe(self) -> None:
        self._pipe_open = False
        os.close(self._wake_r)
        os.close(self._wake_w)

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                try:
                    ready, _, _ = select.select([self._fd, self._wake_r], [], [])
                    if self._fd in ready and not self._stop_event.is_set():
                        self._serve()
                        if self._after is not None:
                            self._after()
                except Exception as e:  # e.g. recv() failing on the queue socket: keep serving
                    if self._stop_event.is_set():
                        break  # a drain ended by stop (fairness.Stopping) or by the unbind
                    self.errors += 1
                    log.error("%s: %s: %s", self.name, type(e).__name__, e)
                    time.sleep(0.01)
        finally:
            with self._pipe_lock:
                self._close_pipe()


@dataclass
class DomainGate:
    cfg: DomainConfig
    layout: GateLayout
    source: LockedOwnerSource
    engine: Engine
    queue: Any = None
    control: control.ControlServer | None = None
    refresher: Refresher | None = None
    threads: list[ServeThread] = field(default_factory=list)
    poll_ports: set[tuple[int, int]] | None = None
    next_poll: float = 0.0
    polls: list[float] = field(default_factory=list)
    ps: Any = None  # its PsAnswerer (xfgate.verdict.ps_answer), made at the first `ps`
    share: CpuShare | None = None  # the packet thread's CPU share (flood fairness)
    qemu_pid: int = 0  # its QEMU (0: unknown): whose activity other domains' floods watch


class Gate:
    def __init__(
        self, options: GateOptions, owner_source_factory: OwnerSourceFactory | None = None
    ) -> None:
        """`owner_source_factory`: None reads the guests' memory (IntrospectionSources: one
        profile per kernel for all of this gate's domains)."""
        self.options = options
        self._owner_source_factory = owner_source_factory or IntrospectionSources()
        self.domains: dict[int, DomainGate] = {}
        self.firewall: Firewall | None = None
        self.log: VerdictLog | None = None
        self._stop = False
        self.loop_errors = 0
        self._wake_r = self._wake_w = -1
        self.netns = ""
        # A service's additions to the main loop: more readable fds (its control socket) and
        # work after every tick (discovery, expiry, reload, watchdog).
        self.readers: dict[int, Callable[[], None]] = {}
        self.tick_hooks: list[Callable[[], None]] = []
        # Set by a service: block/unblock/unknown sent to a domain's control socket go to the
        # service's policy (persisted) instead of the gate's memory.
        self.policy_hook: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        opts = self.options
        if not opts.domains:
            raise ConfigError("give at least one --domain")
        cfgs = [
            with_vifs(resolve_domain(d, opts.domains_file, opts.libvirt_uri)) for d in opts.domains
        ]
        namespaces = {c.netns for c in cfgs}
        if len(namespaces) > 1:
            raise ConfigError(
                f"domains {', '.join(str(c.id) for c in cfgs)} live in different network"
                f" namespaces ({', '.join(sorted(namespaces))}): run one gate per namespace"
            )
        for c in cfgs:
            if not c.vifs:
                raise ConfigError(f"domain {c.id} has no vifs in the domains file")
        self.open(cfgs[0].netns)
        try:
            for i, c in enumerate(cfgs):
                self._start_domain(c, i)
            self._clean_leftovers()
            for dg in self.domains.values():
                self._install(dg)
            for dg in self.domains.values():
                self._start_threads(dg)
            for dg in self.domains.values():
                self._first_walk(dg)
        except BaseException:
            self.stop()
            raise

    def open(self, netns: str) -> None:
        """Enter the namespace of the domains' bridge, reach the firewall, open the verdict
        log: what every domain of this gate shares. `start` calls it; a service calls it once,
        then `add_domain` / `remove_domain` as domains come and go."""
        opts = self.options
        enter_netns(netns)
        self.netns = netns
        for warning in check_prerequisites():
            log.warning("%s", warning)
        self.firewall = Firewall(make_backend())
        if opts.log_target:
            self.log = VerdictLog.open(
                opts.log_target, opts.log_sample, opts.log_max_bytes, opts.log_backups
            )

    def add_domain(self, cfg: DomainConfig, policy: Policy) -> None:
        """Start gating one more domain (after `open`, from the thread that called it: its
        threads inherit the namespace): the same steps `start` takes, for one domain. On
        failure nothing of the domain stays in this process (its kernel rules, adopted or
        new, stay: stopping is not releasing)."""
        if cfg.id in self.domains:
            raise ConfigError(f"domain {cfg.id} is already gated")
        if not cfg.vifs:
            raise ConfigError(f"domain {cfg.id} has no vifs in the domains file")
        if cfg.netns != self.netns:
            raise ConfigError(
                f"domain {cfg.id} lives in network namespace {cfg.netns or '(host)'!r}, this"
                f" gate in {self.netns or '(host)'!r}: run one gate per namespace"
            )
        try:
            self._start_domain(cfg, 0, policy)
            dg = self.domains[cfg.id]
            self._install(dg)
            self._start_threads(dg)
            self._first_walk(dg)
        except BaseException:
            self.remove_domain(cfg.id)
            raise

    def remove_domain(self, domain: int, release: bool = False) -> None:
        """Stop gating one domain: its threads end, its queue is unbound and its control
        socket closed; its kernel rules stay (or go with release_on_exit), as on `stop`.
        `release`: they go in any case, blocked-socket sets too (its VM is gone for good:
        rules left for its vifs would meet a later interface of the same name)."""
        dg = self.domains.pop(domain, None)
        if dg is None:
            return
        self._stop_domains({domain: dg}, release)

    def set_policy(self, domain: int, policy: Policy) -> None:
        """Put `policy` in force for a gated domain (settled flows are decided again)."""
        self._set_policy(self.domains[domain], policy)

    def _start_domain(self, cfg: DomainConfig, index: int, policy: Policy | None = None) -> None:
        opts = self.options
        vifs = {ifindex(v): v for v in cfg.vifs}
        base = opts.queue_num if opts.queue_num is not None else DEFAULT_QUEUE_BASE + cfg.id
        queue_num = base + index if opts.queue_num is not None else base
        layout = GateLayout(cfg.id, cfg.vifs, queue_num, opts.queue_bypass, opts.fastpath)
        raw_source = self._owner_source_factory(cfg, opts)
        source = LockedOwnerSource(raw_source)
        cache = OwnerCache(opts.cache_ttl, opts.negative_ttl)
        engine = Engine(
            cfg.id,
            vifs,
            source,
            opts.policy if policy is None else policy,
            cache,
            self.log,
            opts.fastpath,
            opts.on_error,
        )
        if isinstance(raw_source, CreatorShortcut):
            # A blocked uid's new sockets are dropped by creator without a walk each (a flood
            # of new connections would otherwise walk the guest every 50 ms); the policy read
            # at each lookup, so a live change applies at once.
            raw_source.creator_decides = lambda uid: engine.policy.blocks_creator(uid)
        engine.refresh_view = lambda: source.view(timeout=PACKET_WAIT)
        if engine.degraded:
            log.warning("domain %d: degraded: %s", cfg.id, engine.degraded)
        dg = DomainGate(cfg, layout, source, engine)
        self.domains[cfg.id] = dg
        dg.control = control.ControlServer(
            opts.run_dir, cfg.id, functools.partial(self._control, dg), slow_ops=SLOW_OPS
        )
        dg.qemu_pid = _qemu_pid_or_0(cfg)
        if opts.mode is GateMode.QUEUE:
            stats = engine.stats
            dg.share = CpuShare(
                f"xfgate-packets-{cfg.id}",
                nice=opts.flood_nice,
                cap=opts.flood_cpu,
                verdicts=lambda: (stats.packets, stats.dropped),
                others_busy=lambda: cpu_and_wait(lambda: self._other_qemus(dg)),
            )
            dg.queue = bind_queue(queue_num, _judged_then_shared(engine.handle, dg.share))

    def _other_qemus(self, dg: DomainGate) -> list[int]:
        """The QEMU pids of this gate's other domains (list(): the service adds domains)."""
        return [o.qemu_pid for o in list(self.domains.values()) if o is not dg and o.qemu_pid]

    def clean_leftovers(self, keep: set[int] | None = None) -> None:
        """`_clean_leftovers`, sparing the domains in `keep` too (a service spares every domain
        it knows of, gated yet or not: a guest starting up keeps its enforcement)."""
        self._clean_leftovers(keep or set())

    def _clean_leftovers(self, keep: set[int] | None = None) -> None:
        """Remove chains/sets of domains whose gate is gone and that this gate does not serve.
        Ours are adopted: _install replaces their rules in place, with no window, and the sets
        keep holding until the first walk."""
        assert self.firewall is not None
        run_dir = self.options.run_dir
        live = {
            d
            for d in control.running_domains(run_dir)
            if control.answers(control.socket_path(run_dir, d))
        }
        for d in sorted(self.firewall.leftover_domains()):
            if d in self.domains or d in (keep or set()):
                continue
            if d not in live:
                log.info("removing leftovers of domain %d", d)
                self.firewall.remove(d, persist_blocks=False)

    def _install(self, dg: DomainGate) -> None:
        """The domain's rules, before any walk: nothing passes unseen while the gate warms up."""
        assert self.firewall is not None
        fw = self.firewall
        d = dg.cfg.id
        if self.options.mode is GateMode.QUEUE:
            fw.install(dg.layout)
            for family in (4, 6):
                fw.remove_poll(d, family)  # persisted by an earlier poll-mode gate
            if dg.layout.fastpath:
                why = fw.install_save(dg.layout)
                dg.engine.save_in_postrouting = why is None
                if why is not None:
                    log.warning(
                        "domain %d: cannot save marks in mangle POSTROUTING (%s):"
                        " settling accepted flows with NF_REPEAT instead",
                        d,
                        why,
                    )
            fw.reset_settled(d)  # marks of an earlier run may carry a different policy
        else:
            fw.set_poll_rules(d, dg.cfg.vifs, [])
            dg.next_poll = time.monotonic()
        self._frame_filter(dg)

    def _frame_filter(self, dg: DomainGate) -> None:
        """VLAN/PPPoE/other ethertypes from the vifs: dropped while a block is in force."""
        d = dg.cfg.id
        try:
            if dg.engine.policy.blocks_anything:
                bridge.install(d, dg.cfg.vifs)
            else:
                bridge.remove(d)
        except XfgateError as e:
            log.warning("domain %d: bridge frame filter: %s", d, e)

    def _start_threads(self, dg: DomainGate) -> None:
        d = dg.cfg.id
        if dg.queue is not None and dg.share is not None:
            q = dg.queue
            packets = ServeThread(
                dg.share.name, q.get_fd(), lambda: q.run(block=False), dg.share.after_serve
            )
            dg.share.wait = packets.wait_stop  # a budget wait ends at once when stopping
            dg.threads.append(packets)
        if dg.control is not None:
            dg.threads.append(
                ServeThread(f"xfgate-control-{d}", dg.control.fileno(), dg.control.serve_one)
            )
        for t in dg.threads:
            t.start()

    def _first_walk(self, dg: DomainGate) -> None:
        """Locates the guest kernel (KASLR), fills the owner index, seeds the sets and the
        guest facts; then the periodic refresher."""
        if self.options.mode is not GateMode.QUEUE:
            return
        assert self.firewall is not None
        fw, d = self.firewall, dg.cfg.id
        listeners = None
        blocked_sets = BlockedSetsWriter(fw, d)
        if dg.layout.fastpath:
            listeners = ListenerSets(
                lambda keep, gone: fw.set_listeners(d, keep, gone),
                lambda: fw.revoke_listeners(d),
                lambda: fw.listener_link_stats(d),
            )
        dg.refresher = Refresher(
            d,
            dg.source,
            dg.engine,
            blocked_sets,
            self.options.refresh_interval,
            listeners,
            lambda: fw.reset_settled(d),
        )
        try:
            dg.refresher.refresh_once(walk=True)
            # The first walk's grants are in the kernel before the gate says it is ready.
            dg.refresher.keep_listeners()
        except Exception as e:
            dg.refresher.last_error = f"{type(e).__name__}: {e}"
            log.warning("domain %d: first walk failed: %s", d, e)
        dg.refresher.start()

    def stop(self) -> None:
        """Undo everything; safe to call twice and after a partial start."""
        self._stop_domains(self.domains)
        if self.log is not None:
            self.log.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def _stop_domains(self, domains: dict[int, DomainGate], release: bool = False) -> None:
        errors: list[str] = []
        for dg in domains.values():
            if dg.refresher is not None:
                dg.refresher.stop()
                # No grant outlives the gate: new connections then follow --queue-bypass
                # like every unsettled flow (the keeper renews nothing once stopped).
                try:
                    dg.refresher.revoke_listeners()
                except XfgateError as e:
                    errors.append(str(e))
            for t in dg.threads:
                t.stop()
        for dg in domains.values():
            for t in dg.threads:
                t.join(2 * IDLE_TICK + 1)
            dg.threads.clear()
        if self.firewall is not None and (release or self.options.release_on_exit):
            persist = self.options.persist_blocks and not release
            for d in domains:
                try:
                    # Jumps go first, so no packet is queued to a consumer about to vanish.
                    self.firewall.remove(d, persist_blocks=persist)
                    if not persist:
                        bridge.remove(d)
                except XfgateError as e:
                    errors.append(str(e))
        elif domains:
            log.info(
                "leaving the enforcement of domain(s) %s in the kernel (%s while no gate is"
                " bound); `xfgate cleanup` releases it",
                ", ".join(str(d) for d in domains),
                "unsettled flows pass" if self.options.queue_bypass else "unsettled flows drop",
            )
        for dg in domains.values():
            if dg.queue is not None:
                with contextlib.suppress(Exception):
                    dg.queue.unbind()
                dg.queue = None
            if dg.control is not None:
                dg.control.close()
                dg.control = None
            dg.source.close()
        if errors:
            log.error("cleanup incomplete: %s", "; ".join(errors))

    # --- the loop ----------------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def serve(self, until: Callable[[], bool] | None = None) -> None:
        """Run until SIGINT/SIGTERM (or `until()` is true)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        old_fd = signal.set_wakeup_fd(self._wake_w)
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        queues = ", ".join(f"{d}:queue {g.layout.queue_num}" for d, g in self.domains.items())
        log.info("gate ready (pid %d, mode %s, domains %s)", os.getpid(), self.options.mode, queues)
        try:
            while not self._stop and not (until and until()):
                self._tick()
                self._let_go_gone()
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)

    def _tick(self) -> None:
        # Packets and control requests have their own threads; here: signals and poll mode.
        readers: dict[int, Callable[[], None]] = {self._wake_r: self._drain_wake, **self.readers}
        timeout = IDLE_TICK
        if self.options.mode is GateMode.POLL:
            now = time.monotonic()
            timeout = max(0.0, min([timeout] + [g.next_poll - now for g in self.domains.values()]))
        ready, _, _ = select.select(list(readers), [], [], timeout)
        for fd in ready:
            try:
                readers[fd]()
            except Exception as e:  # e.g. recv() failing on the queue socket: keep serving
                self.loop_errors += 1
                log.error("loop error: %s: %s", type(e).__name__, e)
        if self.options.mode is GateMode.POLL:
            now = time.monotonic()
            for dg in self.domains.values():
                if now >= dg.next_poll:
                    self._poll(dg)
                    dg.next_poll = now + self.options.interval
        for hook in self.tick_hooks:
            try:
                hook()
            except Exception as e:  # a service's housekeeping must not end the gate
                self.loop_errors += 1
                log.error("loop error: %s: %s", type(e).__name__, e)
        if not ready and self.log is not None:
            self.log.flush()

    def _let_go_gone(self) -> None:
        """A domain whose VM is gone (QEMU exited, migrated away) is released: its threads
        stopped, its rules, sets and queue removed, said in the log. With no domain left the
        gate ends."""
        gone = [dg for dg in self.domains.values() if dg.refresher and dg.refresher.gone]
        for dg in gone:
            d = dg.cfg.id
            assert dg.refresher is not None
            why = dg.refresher.gone
            for t in dg.threads:
                t.stop()
            for t in dg.threads:
                t.join(2 * IDLE_TICK + 1)
            problems = []
            if self.firewall is not None:
                try:
                    self.firewall.remove(d, persist_blocks=False)
                    bridge.remove(d)
                except XfgateError as e:
                    problems.append(str(e))
            if dg.queue is not None:
                with contextlib.suppress(Exception):
                    dg.queue.unbind()
            if dg.control is not None:
                dg.control.close()
            dg.source.close()
            del self.domains[d]
            log.error(
                "domain %d let go: %s; its rules, sets and queue are removed%s",
                d,
                why,
                f" (cleanup incomplete: {'; '.join(problems)})" if problems else "",
            )
        if gone and not self.domains:
            log.error("no domain left to serve: the gate ends")
            self._stop = True

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass

    def _poll(self, dg: DomainGate) -> None:
        """Poll mode: one full walk, then the thesis's DROP rules for blocked owners' ports."""
        assert self.firewall is not None
        start = time.monotonic()
        policy = dg.engine.policy
        try:
            view = dg.source.view()
        except Exception as e:
            log.warning("domain %d: poll walk failed: %s", dg.cfg.id, e)
            return
        facts = dg.engine.absorb_view(view)
        ports = blocked_ports(facts.sockets, policy, facts)
        if not view.complete:
            ports |= dg.poll_ports or set()
        dg.polls.append(round((time.monotonic() - start) * 1000, 2))
        del dg.polls[:-100]
        if ports == dg.poll_ports:
            return
        rules = poll_rules(dg.cfg.vifs, ports)
        try:
            self.firewall.set_poll_rules(dg.cfg.id, dg.cfg.vifs, rules)
        except XfgateError as e:  # retried at the next poll
            log.warning("domain %d: poll rules not applied: %s", dg.cfg.id, e)
            return
        path = rule_log_path(self.options.run_dir, dg.cfg.id)
        _append_rule_log(path, dg.cfg.id, dg.poll_ports or set(), ports)
        dg.poll_ports = ports

    # --- control -----------------------------------------------------------------------

    def _control(self, dg: DomainGate, req: dict[str, Any]) -> dict[str, Any] | control.BodyReply:
        op = req.get("op")
        if op == "status":
            return {"ok": True, **self.status(dg)}
        if op == "ps":  # a thread of its own (SLOW_OPS): off the packet and control paths
            from xfgate.verdict.ps_answer import PsAnswerer

            if dg.ps is None:
                dg.ps = PsAnswerer(dg.cfg, dg.source)
            reply: control.BodyReply = dg.ps.answer(req)
            return reply
        if op in ("block", "unblock", "unknown") and self.policy_hook is not None:
            return self.policy_hook(dg.cfg.id, req)
        if op in ("block", "unblock"):
            new = dg.engine.policy.changed(str(op), str(req.get("kind")), str(req.get("value")))
            self._set_policy(dg, new)
            return {"ok": True, "policy": new.to_dict()}
        if op == "unknown":
            new = replace(dg.engine.policy, unknown=Verdict(str(req.get("value"))))
            self._set_policy(dg, new)
            return {"ok": True, "policy": new.to_dict()}
        raise ConfigError(f"unknown control operation {op!r}")

    def _set_policy(self, dg: DomainGate, new: Policy) -> None:
        assert self.firewall is not None
        dg.engine.set_policy(new)  # new snapshot + cache dropped
        if dg.refresher is not None:
            # No listener stays granted under the old policy (a walk under way then computes
            # grants the keeper refuses: their policy is not the engine's).
            dg.refresher.revoke_listeners()
        self._frame_filter(dg)
        if self.options.mode is GateMode.QUEUE:
            # Settled flows are re-decided from their next packet: established flows of a
            # newly blocked owner are cut, those of an unblocked one come back.
            self.firewall.reset_settled(dg.cfg.id)
            if dg.refresher is not None:
                dg.refresher.trigger()
        else:
            dg.next_poll = time.monotonic()

    def _kernel_counters(self, domain: int) -> dict[str, int]:
        if self.firewall is None or self.options.mode is not GateMode.QUEUE:
            return {}
        try:
            return self.firewall.counters(domain)
        except XfgateError:
            return {}

    def status(self, dg: DomainGate) -> dict[str, Any]:
        q = queue_counters().get(dg.layout.queue_num, {})
        ref = dg.refresher
        return {
            "pid": os.getpid(),
            "domain": dg.cfg.id,
            "name": dg.cfg.name,
            "vifs": list(dg.cfg.vifs),
            "mode": self.options.mode,
            "queue_num": dg.layout.queue_num if self.options.mode is GateMode.QUEUE else None,
            "queue_bypass": self.options.queue_bypass,
            "fastpath": self.options.fastpath,
            "policy": dg.engine.policy.to_dict(),
            "stats": dg.engine.stats.to_dict(),
            "cache": dataclasses.asdict(dg.engine.cache.stats()),
            "queue": q,
            "packet_thread": dg.share.stats() if dg.share else {},
            "qemu_pid": dg.qemu_pid,
            "kernel": self._kernel_counters(dg.cfg.id),
            "blocked_ports": ports_text(ref.entries or set())
            if ref
            else _ports_text(dg.poll_ports or set()),
            "blocked": sorted(str(e) for e in (ref.entries or set())) if ref else [],
            "degraded": _degraded(dg),
            "granted_listeners": ports_text(ref.granted) if ref else [],
            "refresh": {
                "walks": ref.walks,
                "settled_resets": ref.settled_resets,
                "grant_renewals": ref.grant_renewals,
                "grant_refusals": ref.grant_refusals,
                "grants_carried": ref.grants_carried,
                "grant_unanswered": ref.grant_unanswered,
                "grant_recomputes": ref.grant_recomputes,
                "sockets_judged": ref.sockets_judged,
                "entries_by_delta": ref.entries_by_delta,
                "entries_rechecked": ref.entries_rechecked,
                "entries_disagreements": ref.entries_disagreements,
                "keeper": ref.keeper_work(),
                "blocked_link": self.firewall.link_stats(dg.cfg.id, "blk")
                if self.firewall is not None
                else {},
                "unchanged": ref.unchanged,
                "last_walk_ms": ref.last_walk_ms,
                "error": ref.last_error,
                **_crosscheck(dg),
            }
            if ref
            else {"poll_walk_ms": dg.polls[-10:]},
        }


def _degraded(dg: DomainGate) -> str:
    """Why the domain's view of the guest is not to be trusted fully, "" when it is."""
    ref = dg.refresher
    why = [w for w in ((ref.degraded, ref.last_error) if ref else ()) if w]
    facts = dg.engine.facts
    if not facts.complete and not why:
        why.append("last walk incomplete: " + "; ".join(facts.problems[:3]))
    if dg.engine.degraded:  # the profile lacks what lookups need: for the gate's whole life
        why.insert(0, dg.engine.degraded)
    return "; ".join(why)


def _crosscheck(dg: DomainGate) -> dict[str, Any]:
    """The introspector's walk and cross-check counters (full walks, incremental refreshes,
    disagreements), read without the source's lock (plain counters)."""
    cc: Any = getattr(dg.source.inner, "crosscheck", None)
    ok = dataclasses.is_dataclass(cc) and not isinstance(cc, type)
    return {"crosscheck": dataclasses.asdict(cc)} if ok else {}


def _ports_text(ports: set[tuple[int, int]]) -> list[str]:
    return [f"{proto_label(p)}/{port}" for p, port in sorted(ports)]


def rule_log_path(run_dir: Path, domain: int) -> Path:
    return run_dir / f"rules-{domain}.log"


def _append_rule_log(
    path: Path, domain: int, old: set[tuple[int, int]], new: set[tuple[int, int]]
) -> None:
    """The thesis's rule log: what was added and removed, when."""
    import json

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for op, ports in (("add", new - old), ("remove", old - new)):
                for p in _ports_text(ports):
                    f.write(
                        json.dumps({"time": stamp, "domain": domain, "op": op, "port": p}) + "\n"
                    )
    except OSError as e:
        log.warning("cannot write rule log %s: %s", path, e)


def _qemu_pid_or_0(cfg: DomainConfig) -> int:
    """The domain's QEMU pid (`qemu_pid`: the QMP socket's peer, checked against qmp.pid, or
    libvirt's); 0: unknown."""
    try:
        return qemu_pid(cfg)
    except (XfgateError, OSError) as e:  # no QMP socket, a raw dump: its vCPUs not watched
        log.info("domain %d: QEMU pid unknown (%s): other domains' floods do not see it", cfg.id, e)
        return 0


def _judged_then_shared(
    handle: Callable[[QueuedPacket], None], share: CpuShare
) -> Callable[[QueuedPacket], None]:
    """The queue's callback: the verdict first, then the packet thread's CPU budget (a flooding
    thread waits there, its packet already answered)."""

    def on_packet(pkt: QueuedPacket) -> None:
        handle(pkt)
        share.after_packet()

    return on_packet


def bind_queue(queue_num: int, callback: Callable[[QueuedPacket], None]) -> Any:
    """Bind NFQUEUE `queue_num`, with errors that say what to do."""
    try:
        from netfilterqueue import NetfilterQueue
    except ImportError as e:
        raise PrerequisiteError(
            f"NetfilterQueue is not importable ({e}): run scripts/bootstrap.sh"
        ) from None
    try:
        q = NetfilterQueue()
    except OSError as e:
        raise PrerequisiteError(
            f"cannot open NFQUEUE ({e}): need root and the nfnetlink_queue module"
            " (`modprobe nfnetlink_queue`)"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf capped by rmem_max: fine
            q.bind(queue_num, callback, max_len=4096)
    except OSError:
        raise QueueError(
            f"NFQUEUE {queue_num} is already bound by another process (another gate? see"
            " `xfgate status`): stop it or choose another --queue-num"
        ) from None
    return q


def run_gate(
    options: GateOptions,
    until: Callable[[], bool] | None = None,
    owner_source_factory: OwnerSourceFactory | None = None,
) -> int:
    """Runs a gate until `until()` or a signal. The owner source is injected: the default reads
    the guest's memory; a test harness may pass its own."""
    gate = Gate(options, owner_source_factory)
    try:
        gate.start()
        gate.serve(until)
    finally:
        gate.stop()
    return 0
