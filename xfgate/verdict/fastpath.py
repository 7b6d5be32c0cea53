"""Kernel side of the gate: iptables chains, ipsets and conntrack marks.

Layout (filter table, IPv4 and IPv6 alike; bridged packets cross FORWARD via br_netfilter)::

    FORWARD   -m physdev --physdev-in  vifD.N --physdev-is-bridged -j XFGATE-D   (from the guest)
              -m physdev --physdev-out vifD.N --physdev-is-bridged -j XFGATE-D   (to the guest)
    XFGATE-D  -j XFGATE-D-BLK                       known ports of blocked owners (ipset)
              -m connmark --mark ACCEPT(D) -j ACCEPT   flow settled earlier: never reaches Python
              -m connmark --mark DROP(D)   -j DROP
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
    XFGATE-D-BLK  -p tcp -m physdev --physdev-in vif -m set --match-set xfgate-D-tcp src -j DROP
                  -p tcp -m physdev --physdev-out vif -m set --match-set xfgate-D-tcp dst -j DROP
                  (and udp)
    XFGATE-D-POLL (poll mode only) the thesis's per-port DROP rules

The sets are ``bitmap:port`` (family-agnostic, one per protocol) keyed by the guest's port:
direction comes from physdev, so a listener bound to the wildcard address needs no address.
Builders here are pure (they return argv fragments); ``IptcBackend`` applies them with
python-iptables (libiptc, i.e. the iptables-legacy backend), ``LegacyCliBackend`` with the
``iptables-legacy`` programs for what libiptc cannot do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from xfgate.errors import FirewallError, PrerequisiteError
from xfgate.inet import PORT_PROTOS, IPProto

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
SUBPROCESS_TIMEOUT = 10.0
MANGLE = "mangle"
DROP = ("-j", "DROP")


def chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}"


def block_chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}-BLK"


def save_chain_name(domain: int) -> str:
    return f"{CHAIN_PREFIX}{domain}-SAVE"


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


def block_rules(domain: int, vifs: Sequence[str]) -> list[Rule]:
    """Drop packets to/from guest ports listed in the domain's sets."""
    rules: list[Rule] = []
    for proto in PROTOS:
        name = proto.label
        match = ("-m", "set", "--match-set", set_name(domain, proto))
        for vif in vifs:
            rules.append(("-p", name, "-m", "physdev", "--physdev-in", vif, *match, "src", *DROP))
            rules.append(("-p", name, "-m", "physdev", "--physdev-out", vif, *match, "dst", *DROP))
    return rules


def queue_rules(layout: GateLayout) -> list[Rule]:
    d = layout.domain
    rules: list[Rule] = [("-j", block_chain_name(d))]
    if layout.fastpath:
        acc, drp = settle_mark(d, True), settle_mark(d, False)
        mask = f"{MARK_MASK:#x}"
        save: Rule = ("-j", "CONNMARK", "--save-mark", "--nfmask", mask, "--ctmask", mask)
        rules += [
            ("-m", "connmark", "--mark", _mark(acc), "-j", "ACCEPT"),
            ("-m", "connmark", "--mark", _mark(drp), "-j", "DROP"),
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


def ipset_create_script(domain: int) -> str:
    return "".join(
        f"create {set_name(domain, p)} bitmap:port range 0-65535 -exist\n" for p in PROTOS
    )


def ipset_replace_script(domain: int, ports: Iterable[tuple[int, int]]) -> str:
    """An ``ipset restore`` script swapping in the new port sets atomically."""
    wanted = sorted(set(ports))
    lines: list[str] = []
    for proto in PROTOS:
        live = set_name(domain, proto)
        tmp = f"{live}-new"
        lines.append(f"create {live} bitmap:port range 0-65535 -exist")
        lines.append(f"create {tmp} bitmap:port range 0-65535 -exist")
        lines.append(f"flush {tmp}")
        lines += [f"add {tmp} {port}" for p, port in wanted if p == proto and 0 < port < 65536]
        lines.append(f"swap {tmp} {live}")
        lines.append(f"destroy {tmp}")
    return "\n".join(lines) + "\n"


def conntrack_reset_argvs(domain: int) -> list[list[str]]:
    """Delete the domain's settled conntrack entries: their next packet is decided afresh
    (TCP mid-stream pickup, nf_conntrack_tcp_loose, re-creates the entry unsettled)."""
    argvs = []
    for family in ("ipv4", "ipv6"):
        for accept in (True, False):
            argvs.append(
                ["conntrack", "-D", "-f", family, "-m", _mark(settle_mark(domain, accept))]
            )
    return argvs


# --- applying ---------------------------------------------------------------------------------


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
    def dump(self, family: int, chain: str, table: str = "filter") -> list[str]: ...


def run(argv: Sequence[str], stdin: str | None = None, check: bool = True) -> str:
    """Run a firewall program, bounded in time; FirewallError with its stderr on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise PrerequisiteError(
            f"{argv[0]} not found: install it (scripts/bootstrap.sh installs iptables, ipset,"
            " conntrack)"
        ) from None
    except subprocess.TimeoutExpired:
        raise FirewallError(f"{' '.join(argv)} did not finish in {SUBPROCESS_TIMEOUT} s") from None
    if check and proc.returncode != 0:
        raise FirewallError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


class LegacyCliBackend:
    """iptables-legacy / ip6tables-legacy programs, fed the same argv fragments."""

    name = "iptables-legacy"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @staticmethod
    def _prog(family: int) -> str:
        return "iptables-legacy" if family == 4 else "ip6tables-legacy"

    def _run(self, family: int, table: str, *args: str, check: bool = True) -> str:
        with self._lock:
            return run([self._prog(family), "-w", "5", "-t", table, *args], check=check)

    def chains(self, family: int, table: str = "filter") -> list[str]:
        out = self._run(family, table, "-S")
        return [line.split()[1] for line in out.splitlines() if line.startswith("-N ")]

    def ensure_chain(self, family: int, chain: str, table: str = "filter") -> None:
        if chain not in self.chains(family, table):
            self._run(family, table, "-N", chain)

    def replace_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        self.ensure_chain(family, chain, table)
        self._run(family, table, "-F", chain)
        for rule in rules:
            self._run(family, table, "-A", chain, *rule)

    def delete_chain(self, family: int, chain: str, table: str = "filter") -> None:
        if chain in self.chains(family, table):
            self._run(family, table, "-F", chain)
            self._run(family, table, "-X", chain)

    def insert_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        for pos, rule in enumerate(rules, start=1):
            self._run(family, table, "-I", chain, str(pos), *rule)

    def delete_jumps(self, family: int, chain: str, target: str, table: str = "filter") -> int:
        removed = 0
        for line in self._run(family, table, "-S", chain).splitlines():
            words = line.split()
            if words[:2] == ["-A", chain] and words[-2:] == ["-j", target]:
                self._run(family, table, "-D", chain, *words[2:])
                removed += 1
        return removed

    def dump(self, family: int, chain: str, table: str = "filter") -> list[str]:
        if chain not in self.chains(family, table):
            return []
        return self._run(family, table, "-S", chain, "-v").splitlines()


class IptcBackend(LegacyCliBackend):
    """python-iptables (libiptc): rules written straight into the legacy tables, no fork per
    rule. Listing/dumping reuses the CLI (human-readable, identical output)."""

    name = "python-iptables"

    def __init__(self) -> None:
        super().__init__()
        try:
            import iptc
        except Exception as e:  # pragma: no cover - depends on the host's libxtables
            raise PrerequisiteError(f"python-iptables cannot load libiptc/libxtables: {e}") from e
        self._iptc: Any = iptc

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

    def _chain(self, family: int, chain: str, table_name: str) -> Any:
        table = self._table(family, table_name)
        if not table.is_chain(chain):
            table.create_chain(chain)
        return self._iptc.Chain(table, chain)

    def ensure_chain(self, family: int, chain: str, table: str = "filter") -> None:
        with self._lock:
            self._wrap(lambda: self._chain(family, chain, table), f"create chain {chain}")

    def replace_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        def do() -> None:
            c = self._chain(family, chain, table)
            c.flush()
            for spec in rules:
                c.append_rule(self._rule(family, spec))

        with self._lock:
            self._wrap(do, f"fill chain {chain}")

    def insert_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        def do() -> None:
            c = self._chain(family, chain, table)
            for spec in reversed(rules):
                c.insert_rule(self._rule(family, spec))

        with self._lock:
            self._wrap(do, f"insert into {chain}")

    def _wrap(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except FirewallError:
            raise
        except Exception as e:
            raise FirewallError(f"python-iptables could not {what}: {e}") from e


def make_backend(name: str = "iptc") -> RuleBackend:
    """ "cli" selects the iptables-legacy programs (``--iptables cli``); default libiptc."""
    if name == "cli":
        return LegacyCliBackend()
    return IptcBackend()


def check_prerequisites() -> list[str]:
    """Raise on what makes the gate impossible; return warnings for what makes it unreliable."""
    if os.geteuid() != 0:
        raise PrerequisiteError("xfgate run needs root (NFQUEUE, iptables, ipset, conntrack)")
    for prog in ("iptables-legacy", "ip6tables-legacy", "ipset", "conntrack"):
        if shutil.which(prog) is None:
            raise PrerequisiteError(f"{prog} not found: run scripts/bootstrap.sh")
    for family in FAMILIES:
        prog = "iptables-legacy" if family == 4 else "ip6tables-legacy"
        try:
            run([prog, "-w", "5", "-t", "filter", "-S", "FORWARD"])
        except FirewallError as e:
            raise PrerequisiteError(
                f"the legacy iptables backend does not work ({e}): load the kernel modules"
                " with `modprobe ip_tables ip6_tables`"
            ) from None
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
    if shutil.which("nft"):
        tables = run(["nft", "list", "tables"], check=False).strip()
        if tables:
            warnings.append(
                "nftables tables exist in this network namespace ("
                + ", ".join(tables.splitlines())
                + "): their rules are evaluated as well as xfgate's legacy iptables rules"
                " and may accept or drop packets before or after xfgate"
            )
    return warnings


class Firewall:
    """Applies and removes one domain's layout. Every method is idempotent."""

    def __init__(self, backend: RuleBackend) -> None:
        self.backend = backend

    def install(self, layout: GateLayout) -> None:
        d = layout.domain
        run(["ipset", "restore", "-exist"], stdin=ipset_create_script(d))
        for family in FAMILIES:
            self.backend.replace_rules(family, block_chain_name(d), block_rules(d, layout.vifs))
            self.backend.replace_rules(family, chain_name(d), queue_rules(layout))
            self.backend.delete_jumps(family, "FORWARD", chain_name(d))
            self.backend.insert_rules(family, "FORWARD", forward_jumps(d, layout.vifs))

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

    def set_blocked_ports(self, domain: int, ports: Iterable[tuple[int, int]]) -> None:
        run(["ipset", "restore", "-exist"], stdin=ipset_replace_script(domain, ports))

    def blocked_ports(self, domain: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for proto in PROTOS:
            text = run(["ipset", "list", set_name(domain, proto)], check=False)
            members = text.partition("Members:\n")[2]
            out += [(proto, int(w)) for w in members.split() if w.isdigit()]
        return out

    def reset_settled(self, domain: int) -> None:
        for argv in conntrack_reset_argvs(domain):
            run(argv, check=False)  # exits 1 when nothing matched: not an error here

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
            if not persist_blocks:
                self.remove_poll(domain, family)
        self.remove_save(domain)
        self.reset_settled(domain)
        if not persist_blocks:
            for proto in PROTOS:
                run(["ipset", "destroy", set_name(domain, proto)], check=False)

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
        for name in run(["ipset", "list", "-n"], check=False).split():
            if name.startswith(SET_PREFIX):
                head = name[len(SET_PREFIX) :].split("-", 1)[0]
                if head.isdigit():
                    found.add(int(head))
        return found

    def counters(self, domain: int) -> dict[str, int]:
        """Packets the kernel decided without us (the fast path), from the rule counters:
        settled flows accepted/dropped, set drops, and what went to the queue."""
        out = {"fastpath_accept": 0, "fastpath_drop": 0, "set_drop": 0, "queued": 0}
        for family in FAMILIES:
            for line in self.backend.dump(family, chain_name(domain)):
                words = line.split()
                if "-c" not in words:
                    continue
                packets = int(words[words.index("-c") + 1])
                if "connmark" in words:
                    out["fastpath_accept" if words[-1] == "ACCEPT" else "fastpath_drop"] += packets
                elif "NFQUEUE" in words:
                    out["queued"] += packets
            for line in self.backend.dump(family, block_chain_name(domain)):
                words = line.split()
                if "-c" in words:
                    out["set_drop"] += int(words[words.index("-c") + 1])
        return out

    def dump(self, domain: int) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for family in FAMILIES:
            for chain in (chain_name(domain), block_chain_name(domain), poll_chain_name(domain)):
                lines = self.backend.dump(family, chain)
                if lines:
                    out[f"ipv{family} {chain}"] = lines
            try:
                lines = self.backend.dump(family, save_chain_name(domain), MANGLE)
            except FirewallError:
                lines = []
            if lines:
                out[f"ipv{family} mangle {save_chain_name(domain)}"] = lines
        return out
