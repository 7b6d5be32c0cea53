"""Kernel side of the gate: iptables chains, ipsets and conntrack marks.

Layout (filter table, IPv4 and IPv6 alike; bridged packets cross FORWARD via br_netfilter)::

    FORWARD   -m physdev --physdev-in  vifD.N --physdev-is-bridged -j XFGATE-D   (from the guest)
              -m physdev --physdev-out vifD.N --physdev-is-bridged -j XFGATE-D   (to the guest)
    XFGATE-D  -m connmark --mark ACCEPT(D) -j ACCEPT   flow settled earlier: never reaches Python
              -j XFGATE-D-BLK                       blocked owners' known sockets (ipsets)
              -m connmark --mark DROP(D)   -j DROP
              -j XFGATE-D-LSN                       a new connection to a granted listener:
                                                    settled ACCEPT(D) and accepted there
              -m mark --mark ACCEPT(D) -j CONNMARK --save-mark   the engine's verdict, repeated
              -m mark --mark ACCEPT(D) -j ACCEPT                 (NF_REPEAT) so the rule set
              (the same two for DROP(D))                         stores it in conntrack
              -j NFQUEUE --queue-num Q [--queue-bypass]

    mangle POSTROUTING  -m physdev --physdev-in|--physdev-out vifD.N --physdev-is-bridged
                        -j XFGATE-D-SAVE
    XFGATE-D-SAVE  -m mark --mark ACCEPT(D) -j CONNMARK --save-mark
                   an accepted first packet (plain NF_ACCEPT with our mark) settles its flow
                   here, before conntrack confirms it: no second FORWARD traversal. Without
                   this chain the engine falls back to NF_REPEAT for accepts too.
    XFGATE-D-BLK  -m physdev --physdev-in vif  -m set --match-set xfgate-D-portF src,src -j DROP
                  -m physdev --physdev-in vif  -m set --match-set xfgate-D-flowF src,src,dst -j DROP
                  -m physdev --physdev-out vif -m set --match-set xfgate-D-portF dst,dst -j DROP
                  -m physdev --physdev-out vif -m set --match-set xfgate-D-flowF dst,dst,src -j DROP
    XFGATE-D-LSN  -p tcp -m physdev --physdev-out vif -m tcp --tcp-flags FIN,SYN,RST,ACK SYN
                  -m conntrack --ctstate NEW -m set --match-set xfgate-D-lsnF dst,dst
                  -j CONNMARK --set-xmark ACCEPT(D), then the same match -j ACCEPT
                                                    (``listeners``: good listeners only, each
                                                    entry renewed by the refresher or gone in 1 s)
    XFGATE-D-POLL (poll mode only) the thesis's per-port DROP rules

The sets (F = 4 or 6, per family) name exactly what they block (``blocksets``): (guest address,
proto:port) for listening and bound sockets, (guest address, proto:port, remote) for connected
ones; the settled-accept rule comes first, so a flow decided as another owner's is never cut by
them.
Builders here are pure (they return argv fragments, set contents, conntrack marks);
``IptcBackend`` applies and lists rules with python-iptables (libiptc, i.e. the legacy tables),
sets and conntrack go through netlink (``nfnetlink``, pyroute2). Nothing forks a program.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from xfgate.errors import FirewallError, PrerequisiteError
from xfgate.inet import PORT_PROTOS, IPProto
from xfgate.verdict.blocksets import (
    BlockEntry,
    set_contents,
    set_entry,
    set_names,
    set_type,
)
from xfgate.verdict.ipset_wire import MAX_ENTRIES, SetChange
from xfgate.verdict.listeners import LISTENER_SET, listener_set_name, listener_set_names
from xfgate.verdict.nfnetlink import (
    PyrouteSets,
    SetAdapter,
    SetEntry,
    SetLink,
    check_conntrack,
    delete_conntrack_marked,
    nft_tables,
)

Rule = tuple[str, ...]
FAMILIES = (4, 6)
PROTOS = PORT_PROTOS  # the protocols a blocked-port set exists for
CHAIN_PREFIX = "XFGATE-"
SET_PREFIX = "xfgate-"
# Our bits of the packet mark / connmark: verdict in bits 16-17, domain id in bits 18-29, so
# one domain's settled flows can be found (and reset) without touching another's.
MARK_MASK = 0x3FFF0000
MARK_ACCEPT = 0x1
MARK_DROP = 0x2
MAX_DOMAIN_TAG = 0xFFF
XTABLES_LOCK = "/run/xtables.lock"  # what iptables-legacy -w locks
XTABLES_LOCK_TIMEOUT = 5.0
NO_PROTOCOL = frozenset({"ip", "0", "all", "hopopt", "ipv6"})  # libiptc's names for "any"
T = TypeVar("T")
MANGLE = "mangle"
DROP = ("-j", "DROP")


def chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}"


def block_chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}-BLK"


def save_chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}-SAVE"


def listener_chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}-LSN"


def poll_chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}-POLL"


def set_name(domain: int, proto: int) -> str:
    return f"{SET_PREFIX}{domain}-{IPProto(proto).label}"


def domain_of_chain(name: str) -> int | None:
    """The domain id in one of our chain names (for cleaning leftovers), else None."""
    if not name.startswith(CHAIN_PREFIX):
        return None
    head = name[len(CHAIN_PREFIX) :].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def settle_mark(domain: int, accept: bool) -> int:
    if not 0 <= domain <= MAX_DOMAIN_TAG:
        raise FirewallError(f"domain id {domain} does not fit the mark (0-{MAX_DOMAIN_TAG})")
    return (domain << 18) | ((MARK_ACCEPT if accept else MARK_DROP) << 16)


def _mark(value: int) -> str:
    return f"{value:#x}/{MARK_MASK:#x}"


@dataclass(frozen=True)
class GateLayout:
    domain: int
    vifs: tuple[str, ...]
    queue_num: int
    queue_bypass: bool = False
    fastpath: bool = True  # False: every packet through Python (benchmarks, debugging)


def forward_jumps(domain: int, vifs: Sequence[str], target: str | None = None) -> list[Rule]:
    """FORWARD rules sending the domain's bridged packets, both directions, to its chain."""
    target = target or chain_name(domain)
    rules: list[Rule] = []
    for vif in vifs:
        for opt in ("--physdev-in", "--physdev-out"):
            rules.append(("-m", "physdev", opt, vif, "--physdev-is-bridged", "-j", target))
    return rules


def block_rules(domain: int, vifs: Sequence[str], family: int) -> list[Rule]:
    """Drop packets from (source) and to (destination) the blocked guest sockets listed in the
    domain's sets of this family."""
    from xfgate.verdict.blocksets import flow_set_name, port_set_name

    ports, flows = port_set_name(domain, family), flow_set_name(domain, family)
    rules: list[Rule] = []
    for vif in vifs:
        out = ("-m", "physdev", "--physdev-in", vif, "-m", "set", "--match-set")
        into = ("-m", "physdev", "--physdev-out", vif, "-m", "set", "--match-set")
        rules.append((*out, ports, "src,src", *DROP))
        rules.append((*out, flows, "src,src,dst", *DROP))
        rules.append((*into, ports, "dst,dst", *DROP))
        rules.append((*into, flows, "dst,dst,src", *DROP))
    return rules


def listener_rules(domain: int, vifs: Sequence[str], family: int) -> list[Rule]:
    """A new incoming connection (a SYN of a NEW conntrack flow) to a granted listener: its
    conntrack entry gets the settled-accept mark here and the SYN is accepted, so the SYN-ACK
    and the rest of the flow are settled without the engine (the mark rules of XFGATE-D stay
    the engine's: only its NF_REPEAT answers cross them)."""
    settle = ("-j", "CONNMARK", "--set-xmark", _mark(settle_mark(domain, True)))
    syn = ("-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN")
    new = ("-m", "conntrack", "--ctstate", "NEW")
    granted = ("-m", "set", "--match-set", listener_set_name(domain, family), "dst,dst")
    rules: list[Rule] = []
    for vif in vifs:
        match = ("-p", "tcp", "-m", "physdev", "--physdev-out", vif, *syn, *new, *granted)
        rules += [(*match, *settle), (*match, "-j", "ACCEPT")]
    return rules


def queue_rules(layout: GateLayout) -> list[Rule]:
    d = layout.domain
    if not layout.fastpath:
        rules: list[Rule] = [("-j", block_chain_name(d))]
    else:
        acc, drp = settle_mark(d, True), settle_mark(d, False)
        mask = f"{MARK_MASK:#x}"
        save: Rule = ("-j", "CONNMARK", "--save-mark", "--nfmask", mask, "--ctmask", mask)
        # A settled accept first: the sets never cut a flow decided as another owner's.
        rules = [
            ("-m", "connmark", "--mark", _mark(acc), "-j", "ACCEPT"),
            ("-j", block_chain_name(d)),
            ("-m", "connmark", "--mark", _mark(drp), "-j", "DROP"),
            ("-j", listener_chain_name(d)),
            ("-m", "mark", "--mark", _mark(acc), *save),
            ("-m", "mark", "--mark", _mark(acc), "-j", "ACCEPT"),
            ("-m", "mark", "--mark", _mark(drp), *save),
            ("-m", "mark", "--mark", _mark(drp), "-j", "DROP"),
        ]
    queue: Rule = ("-j", "NFQUEUE", "--queue-num", str(layout.queue_num))
    if layout.queue_bypass:
        queue += ("--queue-bypass",)
    rules.append(queue)
    return rules


def postrouting_jumps(domain: int, vifs: Sequence[str]) -> list[Rule]:
    """mangle POSTROUTING rules sending the domain's bridged packets to its save chain."""
    return forward_jumps(domain, vifs, save_chain_name(domain))


def save_rules(domain: int) -> list[Rule]:
    """Store an accepted packet's mark in its conntrack entry. Only ACCEPT: a dropped first
    packet never gets here (and DROP answers still go through NF_REPEAT)."""
    mask = f"{MARK_MASK:#x}"
    save = ("-j", "CONNMARK", "--save-mark", "--nfmask", mask, "--ctmask", mask)
    return [("-m", "mark", "--mark", _mark(settle_mark(domain, True)), *save)]


def persisted_queue_rules(domain: int) -> list[Rule]:
    """What XFGATE-D keeps after a clean exit with --persist-blocks: the set drops only."""
    return [("-j", block_chain_name(domain))]


def poll_rules(vifs: Sequence[str], ports: Iterable[tuple[int, int]]) -> list[Rule]:
    """The thesis's rules: per blocked (proto, guest port), one DROP each way, sorted, no dups."""
    rules: list[Rule] = []
    for proto, port in sorted(set(ports)):
        name = IPProto(proto).label
        for vif in vifs:
            physdev_in = ("-m", "physdev", "--physdev-in", vif)
            physdev_out = ("-m", "physdev", "--physdev-out", vif)
            # An explicit "-m tcp|udp": libiptc does not load the protocol match implicitly.
            rules.append(("-p", name, *physdev_in, "-m", name, "--sport", str(port), *DROP))
            rules.append(("-p", name, *physdev_out, "-m", name, "--dport", str(port), *DROP))
    return rules


def staging_set_name(name: str) -> str:
    """The set a new port list is built in before it is swapped with the live one."""
    return f"{name}-new"


def settled_marks(domain: int) -> list[tuple[int, int]]:
    """(mark, mask) of the domain's settled conntrack entries, accept and drop. Deleting them
    makes each flow's next packet be decided afresh (TCP mid-stream pickup,
    nf_conntrack_tcp_loose, re-creates the entry unsettled)."""
    return [(settle_mark(domain, accept), MARK_MASK) for accept in (True, False)]


# --- applying ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListedRule:
    """One rule as the kernel holds it: the argv fragment that would create it, its counters."""

    spec: Rule
    packets: int = 0
    bytes: int = 0

    @property
    def target(self) -> str:
        return self.spec[self.spec.index("-j") + 1] if "-j" in self.spec else ""


def render_rule(chain: str, rule: ListedRule) -> str:
    """``iptables -S -v`` style: ``-A CHAIN <matches> -c PACKETS BYTES -j TARGET <options>``."""
    spec = list(rule.spec)
    cut = spec.index("-j") if "-j" in spec else len(spec)
    counters = ["-c", str(rule.packets), str(rule.bytes)]
    return " ".join(["-A", chain, *spec[:cut], *counters, *spec[cut:]])


class RuleBackend(Protocol):
    name: str

    def chains(self, family: int, table: str = "filter") -> list[str]: ...
    def ensure_chain(self, family: int, chain: str, table: str = "filter") -> None: ...
    def replace_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None: ...
    def delete_chain(self, family: int, chain: str, table: str = "filter") -> None: ...
    def insert_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None: ...
    def delete_jumps(self, family: int, chain: str, target: str, table: str = "filter") -> int: ...
    def listing(self, family: int, chain: str, table: str = "filter") -> list[ListedRule]:
        """The chain's rules with their counters; [] when the chain does not exist."""
        ...


class XtablesLock:
    """The lock iptables-legacy's ``-w`` takes (flock on /run/xtables.lock): libiptc commits
    replace a whole table, so writers in the same host serialise on it as the CLI does."""

    def __init__(self, path: str = XTABLES_LOCK, timeout: float = XTABLES_LOCK_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise FirewallError(f"cannot open the xtables lock {self.path}: {e}") from e
            try:
                deadline = time.monotonic() + self.timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise FirewallError(
                                f"{self.path} held by another program for {self.timeout} s"
                            ) from None
                        time.sleep(0.05)
                yield
            finally:
                os.close(fd)  # releases the flock


class IptcBackend:
    """python-iptables (libiptc): rules written into and read from the legacy tables, no fork.

    Writes and reads hold the xtables lock; every table is refreshed before use (another gate
    or the CLI may have changed it since libiptc cached it)."""

    name = "python-iptables"

    def __init__(self, lock: XtablesLock | None = None) -> None:
        try:
            import iptc
        except Exception as e:  # pragma: no cover - depends on the host's libxtables
            raise PrerequisiteError(f"python-iptables cannot load libiptc/libxtables: {e}") from e
        self._iptc: Any = iptc
        self._lock = lock or XtablesLock()

    def _table(self, family: int, name: str) -> Any:
        iptc = self._iptc
        table = iptc.Table(name) if family == 4 else iptc.Table6(name)
        table.autocommit = True  # batched commits hit EAGAIN on a freshly created table here
        table.refresh()  # drop libiptc's cached copy: the CLI or another gate may have changed it
        return table

    def _rule(self, family: int, spec: Rule) -> Any:
        iptc = self._iptc
        rule = iptc.Rule() if family == 4 else iptc.Rule6()
        current: Any = None
        i = 0
        while i < len(spec):
            token = spec[i]
            if token == "-p":
                rule.protocol = spec[i + 1]
                i += 2
            elif token == "-m":
                current = rule.create_match(spec[i + 1])
                i += 2
            elif token == "-j":
                current = rule.create_target(spec[i + 1])
                i += 2
            elif token.startswith("--") and current is not None:
                j = i + 1
                while j < len(spec) and not spec[j].startswith("-"):
                    j += 1
                values = list(spec[i + 1 : j])
                value: Any = values if len(values) > 1 else (values[0] if values else "")
                setattr(current, token[2:].replace("-", "_"), value)
                i = j
            else:
                raise FirewallError(f"rule token {token!r} not understood in {' '.join(spec)}")
        return rule

    @staticmethod
    def _spec(rule: Any) -> Rule:
        """The argv fragment of a rule read back from libiptc (the inverse of ``_rule``)."""
        spec: list[str] = []
        if str(rule.protocol) not in NO_PROTOCOL:
            spec += ["-p", str(rule.protocol)]
        for match in rule.matches:
            spec += ["-m", match.name]
            for key, values in match.get_all_parameters().items():
                spec += [f"--{key}", *values]
        target = rule.target
        if target is not None and target.name:
            spec += ["-j", target.name]
            for key, values in target.get_all_parameters().items():
                spec += [f"--{key}", *values]
        return tuple(spec)

    def _chain(self, family: int, chain: str, table_name: str) -> Any:
        table = self._table(family, table_name)
        if not table.is_chain(chain):
            table.create_chain(chain)
        return self._iptc.Chain(table, chain)

    def _locked(self, what: str, fn: Callable[[], T]) -> T:
        with self._lock.held():
            try:
                return fn()
            except FirewallError:
                raise
            except Exception as e:
                raise FirewallError(f"python-iptables could not {what}: {e}") from e

    def chains(self, family: int, table: str = "filter") -> list[str]:
        def do() -> list[str]:
            return [c.name for c in self._table(family, table).chains]

        return self._locked(f"list the {table} table", do)

    def ensure_chain(self, family: int, chain: str, table: str = "filter") -> None:
        self._locked(f"create chain {chain}", lambda: self._chain(family, chain, table))

    def replace_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        # No window: the new rules go in after the old ones, then the old ones leave from the
        # last to the first, so every intermediate chain is (a prefix of the old) + the new.
        # (autocommit: each step is one libiptc commit; a flush first would leave an empty
        # chain, i.e. an unfiltered guest, between two of them.)
        def do() -> None:
            c = self._chain(family, chain, table)
            old = len(c.rules)
            for spec in rules:
                c.append_rule(self._rule(family, spec))
            for _ in range(old):
                current = c.rules
                c.delete_rule(current[old - 1])
                old -= 1

        self._locked(f"fill chain {chain}", do)

    def insert_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        def do() -> None:
            c = self._chain(family, chain, table)
            for spec in reversed(rules):
                c.insert_rule(self._rule(family, spec))

        self._locked(f"insert into {chain}", do)

    def delete_chain(self, family: int, chain: str, table: str = "filter") -> None:
        def do() -> None:
            t = self._table(family, table)
            if t.is_chain(chain):
                self._iptc.Chain(t, chain).flush()
                t.delete_chain(chain)

        self._locked(f"delete chain {chain}", do)

    def delete_jumps(self, family: int, chain: str, target: str, table: str = "filter") -> int:
        def do() -> int:
            t = self._table(family, table)
            if not t.is_chain(chain):
                return 0
            c = self._iptc.Chain(t, chain)
            doomed = [r for r in c.rules if r.target is not None and r.target.name == target]
            for rule in doomed:
                c.delete_rule(rule)
            return len(doomed)

        return self._locked(f"delete jumps to {target} from {chain}", do)

    def listing(self, family: int, chain: str, table: str = "filter") -> list[ListedRule]:
        def do() -> list[ListedRule]:
            t = self._table(family, table)
            if not t.is_chain(chain):
                return []
            out = []
            for rule in self._iptc.Chain(t, chain).rules:
                packets, nbytes = rule.get_counters()
                out.append(ListedRule(self._spec(rule), int(packets), int(nbytes)))
            return out

        return self._locked(f"list chain {chain}", do)


def make_backend() -> RuleBackend:
    """The rule backend: python-iptables (libiptc, the legacy tables)."""
    return IptcBackend()


def check_prerequisites(backend: RuleBackend | None = None) -> list[str]:
    """Raise on what makes the gate impossible; return warnings for what makes it unreliable."""
    if os.geteuid() != 0:
        raise PrerequisiteError("xfgate run needs root (NFQUEUE, iptables, ipset, conntrack)")
    backend = backend or make_backend()
    for family in FAMILIES:
        try:
            if "FORWARD" not in backend.chains(family):
                raise FirewallError(f"no FORWARD chain in the IPv{family} filter table")
        except FirewallError as e:
            raise PrerequisiteError(
                f"the legacy iptables backend does not work ({e}): load the kernel modules"
                " with `modprobe ip_tables ip6_tables`"
            ) from None
    PyrouteSets().check()
    check_conntrack()
    warnings: list[str] = []
    for key in ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables"):
        path = f"/proc/sys/net/bridge/{key}"
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            raise PrerequisiteError(
                f"{path} missing: bridged packets would bypass iptables; `modprobe br_netfilter`"
            ) from None
        if value != "1":
            raise PrerequisiteError(
                f"net.bridge.{key} is {value}: bridged packets bypass iptables;"
                f" `sysctl -w net.bridge.{key}=1` in this network namespace"
            )
    tables = nft_tables()
    if tables:
        warnings.append(
            "nftables tables exist in this network namespace ("
            + ", ".join(tables)
            + "): their rules are evaluated as well as xfgate's legacy iptables rules"
            " and may accept or drop packets before or after xfgate"
        )
    return warnings


def _set_entries(entries: Iterable[BlockEntry]) -> tuple[SetEntry, ...]:
    return tuple(set_entry(e) for e in sorted(entries))


class Firewall:
    """Applies and removes one domain's layout. Every method is idempotent."""

    def __init__(self, backend: RuleBackend, sets: SetAdapter | None = None) -> None:
        self.backend = backend
        self.sets: SetAdapter = sets if sets is not None else PyrouteSets()
        # Kept netlink links per domain: the grant keeper's renewals (set_listeners, "lsn")
        # and the refresher's changes of the blocked sets (set_blocked, "blk"), each its own
        # socket (two threads).
        self._links: dict[tuple[int, str], SetLink] = {}
        self._links_lock = threading.Lock()

    def _link(self, domain: int, use: str) -> SetLink:
        with self._links_lock:
            link = self._links.get((domain, use))
            if link is None:
                link = self._links[(domain, use)] = self.sets.link()
            return link

    def link_stats(self, domain: int, use: str) -> dict[str, int]:
        """What one of the domain's links did (``ipset_wire.LinkStats``); {} before any."""
        with self._links_lock:
            link = self._links.get((domain, use))
        return link.stats.to_dict() if link is not None else {}

    def listener_link_stats(self, domain: int) -> dict[str, int]:
        return self.link_stats(domain, "lsn")

    def close_links(self, domain: int) -> None:
        with self._links_lock:
            links = [self._links.pop(k) for k in list(self._links) if k[0] == domain]
        for link in links:
            link.close()

    def _create_sets(self, domain: int) -> None:
        with self.sets.session() as sets:
            for name in set_names(domain):
                sets.create(name, set_type(name))
            for family in FAMILIES:
                sets.create(listener_set_name(domain, family), LISTENER_SET[family])

    def install(self, layout: GateLayout) -> None:
        d = layout.domain
        self._create_sets(d)
        for family in FAMILIES:
            blk = block_rules(d, layout.vifs, family)
            self.backend.replace_rules(family, block_chain_name(d), blk)
            lsn = listener_rules(d, layout.vifs, family) if layout.fastpath else []
            self.backend.replace_rules(family, listener_chain_name(d), lsn)
            self.backend.replace_rules(family, chain_name(d), queue_rules(layout))
            self._ensure_jumps(family, "FORWARD", chain_name(d), forward_jumps(d, layout.vifs))

    def _ensure_jumps(
        self, family: int, chain: str, target: str, jumps: Sequence[Rule], table: str = "filter"
    ) -> None:
        """Adopt the jumps a stopped gate left when they are the ones wanted (no window); else
        put the wanted ones in (a changed vif list: the old jumps go, then the new come)."""
        present = [r.spec for r in self.backend.listing(family, chain, table) if r.target == target]
        if sorted(present) == sorted(jumps):
            return
        self.backend.delete_jumps(family, chain, target, table)
        self.backend.insert_rules(family, chain, jumps, table)

    def install_save(self, layout: GateLayout) -> str | None:
        """The mangle POSTROUTING save chain (both families), so accepts settle without
        NF_REPEAT. Returns None when installed, else why not (nothing of it is left behind)."""
        d = layout.domain
        try:
            for family in FAMILIES:
                self.backend.replace_rules(family, save_chain_name(d), save_rules(d), MANGLE)
                self.backend.delete_jumps(family, "POSTROUTING", save_chain_name(d), MANGLE)
                jumps = postrouting_jumps(d, layout.vifs)
                self.backend.insert_rules(family, "POSTROUTING", jumps, MANGLE)
        except FirewallError as e:
            self.remove_save(d)
            return str(e)
        return None

    def remove_save(self, domain: int) -> None:
        """Best effort: a kernel without the mangle table has nothing of ours there."""
        for family in FAMILIES:
            try:
                self.backend.delete_jumps(family, "POSTROUTING", save_chain_name(domain), MANGLE)
                self.backend.delete_chain(family, save_chain_name(domain), MANGLE)
            except FirewallError:
                pass

    def set_blocked(
        self,
        domain: int,
        entries: Iterable[BlockEntry],
        applied: dict[str, frozenset[BlockEntry]] | None = None,
    ) -> None:
        """The live sets never go through a state with fewer entries than either list.
        `applied`: what the caller last put in each set with this call (updated here): a set
        with the same members is not touched; one whose members changed gets the difference,
        additions before deletions, every changed set's in one send over the domain's kept
        link (a refresh usually changes one flow set of four: through pyroute2 that was a
        socket, 5 requests and one request per member). A set not in `applied` (the first
        call, or after a failed one) is filled in a staging set, then swapped in atomically."""
        contents = {
            live: frozenset(members) for live, members in set_contents(domain, entries).items()
        }
        known = {} if applied is None else applied
        # A set whose difference is larger than one message takes (a policy change, a burst
        # of new flows) is swapped whole, as the first time.
        changed = {
            live: same
            for live, same in contents.items()
            if live in known
            and known[live] != same
            and max(len(same - known[live]), len(known[live] - same)) <= MAX_ENTRIES
        }
        for live, same in contents.items():
            if live in known and known[live] != same and live not in changed:
                del known[live]
        if changed:
            adds = [SetChange("add", n, _set_entries(s - known[n])) for n, s in changed.items()]
            dels = [SetChange("del", n, _set_entries(known[n] - s)) for n, s in changed.items()]
            try:
                self._link(domain, "blk").apply(adds + dels)
            except FirewallError:
                for live in changed:  # the kernel's sets are not known now: swap them next
                    known.pop(live, None)
                raise
            known.update(changed)
        swaps = {live: same for live, same in contents.items() if live not in known}
        if not swaps:
            return
        with self.sets.session() as sets:
            for live, same in swaps.items():
                members = sorted(same)
                kind = set_type(live)
                staging = staging_set_name(live)
                sets.create(live, kind)
                sets.create(staging, kind)
                sets.flush(staging)
                sets.add(staging, kind, [set_entry(e) for e in members])
                sets.swap(staging, live)
                sets.destroy(staging)
                if applied is not None:
                    applied[live] = same

    def set_listeners(
        self, domain: int, entries: Iterable[BlockEntry], gone: Iterable[BlockEntry] = ()
    ) -> None:
        """Add or renew (the set's timeout starts again) the granted listeners' entries and
        delete those in ``gone`` at once: one send over the domain's kept link, one netlink
        request per set and operation (``ipset_wire``), deletions before additions."""
        keep = set(entries)
        changes: list[SetChange] = []
        for family in FAMILIES:
            name = listener_set_name(domain, family)
            drop = [set_entry(e) for e in sorted(set(gone) - keep) if e.family == family]
            add = [set_entry(e) for e in sorted(keep) if e.family == family]
            changes += [SetChange("del", name, tuple(drop)), SetChange("add", name, tuple(add))]
        self._link(domain, "lsn").apply(changes)

    def revoke_listeners(self, domain: int) -> None:
        """Empty the granted-listener sets (a policy change, a stop)."""
        with self.sets.session() as sets:
            for family in FAMILIES:
                with contextlib.suppress(FirewallError):  # absent (poll mode): nothing to do
                    sets.flush(listener_set_name(domain, family))

    def granted(self, domain: int) -> list[str]:
        """The granted-listener entries, as `ipset list` prints them."""
        with self.sets.session() as sets:
            return [
                m
                for fam in FAMILIES
                for m in sets.member_texts(listener_set_name(domain, fam), LISTENER_SET[fam])
            ]

    def blocked(self, domain: int) -> list[str]:
        """The members of the domain's sets, as `ipset list` prints them."""
        out: list[str] = []
        with self.sets.session() as sets:
            for name in set_names(domain):
                out += sets.member_texts(name, set_type(name))
        return out

    def reset_settled(self, domain: int) -> None:
        for mark, mask in settled_marks(domain):
            delete_conntrack_marked(mark, mask)

    def set_poll_rules(self, domain: int, vifs: Sequence[str], rules: Sequence[Rule]) -> None:
        for family in FAMILIES:
            self.backend.replace_rules(family, poll_chain_name(domain), rules)
            self.backend.delete_jumps(family, "FORWARD", poll_chain_name(domain))
            self.backend.insert_rules(
                family, "FORWARD", forward_jumps(domain, vifs, poll_chain_name(domain))
            )

    def remove(self, domain: int, persist_blocks: bool = False) -> None:
        """Remove the domain's chains, jumps, sets and conntrack marks. With ``persist_blocks``
        keep the kernel-side blocks of known ports: the sets (XFGATE-D reduced to its jump into
        XFGATE-D-BLK) in queue mode, the XFGATE-D-POLL rules in poll mode."""
        for family in FAMILIES:
            chains = set(self.backend.chains(family))
            queue, block = chain_name(domain), block_chain_name(domain)
            if persist_blocks and queue in chains and block in chains:
                self.backend.replace_rules(family, queue, persisted_queue_rules(domain))
            else:
                self.backend.delete_jumps(family, "FORWARD", queue)
                self.backend.delete_chain(family, queue)
                if not persist_blocks:
                    self.backend.delete_chain(family, block)
            # Nothing refers to it any more: XFGATE-D is gone or only jumps to XFGATE-D-BLK.
            self.backend.delete_chain(family, listener_chain_name(domain))
            if not persist_blocks:
                self.remove_poll(domain, family)
        self.remove_save(domain)
        self.reset_settled(domain)
        self.close_links(domain)
        with self.sets.session() as sets:
            for name in listener_set_names(domain):
                sets.destroy(name)
        if not persist_blocks:
            with self.sets.session() as sets:
                # bitmap:port sets of an older gate (set_name) too
                for live in set_names(domain) + [set_name(domain, p) for p in PROTOS]:
                    sets.destroy(staging_set_name(live))  # left by a gate killed mid-swap
                    sets.destroy(live)

    def remove_poll(self, domain: int, family: int) -> None:
        self.backend.delete_jumps(family, "FORWARD", poll_chain_name(domain))
        self.backend.delete_chain(family, poll_chain_name(domain))

    def leftover_domains(self) -> set[int]:
        """Domains with xfgate chains or sets in this network namespace."""
        found: set[int] = set()
        for family in FAMILIES:
            names = list(self.backend.chains(family))
            with contextlib.suppress(FirewallError):  # no mangle table: nothing of ours there
                names += self.backend.chains(family, MANGLE)
            for chain in names:
                d = domain_of_chain(chain)
                if d is not None:
                    found.add(d)
        for name in self.sets.names():
            if name.startswith(SET_PREFIX):
                head = name[len(SET_PREFIX) :].split("-", 1)[0]
                if head.isdigit():
                    found.add(int(head))
        return found

    def counters(self, domain: int) -> dict[str, int]:
        """Packets the kernel decided without us (the fast path), from the rule counters:
        settled flows accepted/dropped, set drops, and what went to the queue."""
        out = {
            "fastpath_accept": 0,
            "fastpath_drop": 0,
            "set_drop": 0,
            "queued": 0,
            "listener_accept": 0,  # new connections to granted listeners, never queued
        }
        for family in FAMILIES:
            for rule in self.backend.listing(family, chain_name(domain)):
                if "connmark" in rule.spec:
                    key = "fastpath_accept" if rule.target == "ACCEPT" else "fastpath_drop"
                    out[key] += rule.packets
                elif rule.target == "NFQUEUE":
                    out["queued"] += rule.packets
            for rule in self.backend.listing(family, block_chain_name(domain)):
                out["set_drop"] += rule.packets
            for rule in self.backend.listing(family, listener_chain_name(domain)):
                if rule.target == "ACCEPT":
                    out["listener_accept"] += rule.packets
        return out

    def dump(self, domain: int) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for family in FAMILIES:
            chains = (
                chain_name(domain),
                block_chain_name(domain),
                listener_chain_name(domain),
                poll_chain_name(domain),
            )
            for chain in chains:
                lines = [render_rule(chain, r) for r in self.backend.listing(family, chain)]
                if lines:
                    out[f"ipv{family} {chain}"] = lines
            save = save_chain_name(domain)
            try:
                lines = [render_rule(save, r) for r in self.backend.listing(family, save, MANGLE)]
            except FirewallError:
                lines = []
            if lines:
                out[f"ipv{family} mangle {save}"] = lines
        return out
