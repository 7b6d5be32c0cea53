"""The gate's kernel plumbing: ipsets, conntrack and rule listings.

Beside a fake (set and rule operations recorded, checked for order), the real thing: the same
adapters in a fresh network namespace (``unshare -n``), checked against the command-line
tools as independent oracles (``ipset list``, ``conntrack -L``, ``iptables-legacy -S -v``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from ipaddress import ip_address
from typing import Any, ClassVar

import pytest

from tests.fresh_netns import probe_in_fresh_netns
from xfgate.errors import ConfigError, FirewallError
from xfgate.flow import GuestSocket
from xfgate.inet import IPProto
from xfgate.verdict import fastpath
from xfgate.verdict.blocksets import PORT_SET, socket_entries
from xfgate.verdict.fastpath import (
    MARK_MASK,
    Firewall,
    GateLayout,
    IptcBackend,
    ListedRule,
    Rule,
    block_chain_name,
    block_rules,
    chain_name,
    listener_chain_name,
    listener_rules,
    queue_rules,
    render_rule,
    settle_mark,
)
from xfgate.verdict.ipset_wire import LinkStats, SetChange
from xfgate.verdict.netns import enter_netns, ifindex
from xfgate.verdict.nfnetlink import (
    BITMAP_PORT,
    PyrouteSets,
    SetEntry,
    SetType,
    delete_conntrack_marked,
    nft_tables,
)


class FakeSets:
    """Sets as Python sets; every operation recorded in order."""

    def __init__(self) -> None:
        self.sets: dict[str, set[SetEntry]] = {}
        self.ops: list[tuple[str, str, tuple[SetEntry, ...]]] = []

    def create(self, name: str, kind: SetType) -> None:
        self.ops.append(("create", name, ()))
        self.sets.setdefault(name, set())

    def add(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None:
        self.ops.append(("add", name, tuple(entries)))
        self.sets[name].update(entries)

    def delete(self, name: str, kind: SetType, entries: Sequence[SetEntry]) -> None:
        self.ops.append(("delete", name, tuple(entries)))
        self.sets[name].difference_update(entries)

    def members(self, name: str, kind: SetType) -> list[int]:
        return sorted(e for e in self.sets.get(name, set()) if isinstance(e, int))

    def member_texts(self, name: str, kind: SetType) -> list[str]:
        return sorted(str(e) for e in self.sets.get(name, set()))

    def flush(self, name: str) -> None:
        self.ops.append(("flush", name, ()))
        self.sets[name].clear()

    def swap(self, name_a: str, name_b: str) -> None:
        self.ops.append(("swap", f"{name_a} {name_b}", ()))
        self.sets[name_a], self.sets[name_b] = self.sets[name_b], self.sets[name_a]

    def destroy(self, name: str) -> None:
        self.ops.append(("destroy", name, ()))
        self.sets.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self.sets)

    @contextlib.contextmanager
    def session(self) -> Iterator[FakeSets]:
        self.ops.append(("session", "", ()))
        yield self

    def link(self) -> FakeLink:
        self.ops.append(("link", "", ()))
        return FakeLink(self)


class FakeLink:
    """A kept link over FakeSets: each apply is one send of every non-empty change."""

    def __init__(self, sets: FakeSets) -> None:
        self.sets = sets
        self.stats = LinkStats()
        self.closed = False

    def apply(self, changes: Sequence[SetChange]) -> None:
        todo = [c for c in changes if c.entries]
        self.stats.calls += 1
        if not todo:
            return
        self.stats.sends += 1
        self.stats.requests += len(todo)
        for c in todo:
            if c.op == "add":
                self.sets.add(c.name, PORT_SET[4], c.entries)
            else:
                self.sets.delete(c.name, PORT_SET[4], c.entries)

    def close(self) -> None:
        self.closed = True


class ListingBackend:
    """Rules kept per chain as ListedRules; writes replace them with zero counters."""

    name = "fake"

    def __init__(self) -> None:
        self.rules: dict[tuple[int, str, str], list[ListedRule]] = {}

    def chains(self, family: int, table: str = "filter") -> list[str]:
        return [c for f, c, t in self.rules if f == family and t == table]

    def ensure_chain(self, family: int, chain: str, table: str = "filter") -> None:
        self.rules.setdefault((family, chain, table), [])

    def replace_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        self.rules[(family, chain, table)] = [ListedRule(r) for r in rules]

    def delete_chain(self, family: int, chain: str, table: str = "filter") -> None:
        self.rules.pop((family, chain, table), None)

    def insert_rules(
        self, family: int, chain: str, rules: Sequence[Rule], table: str = "filter"
    ) -> None:
        old = self.rules.get((family, chain, table), [])
        self.rules[(family, chain, table)] = [ListedRule(r) for r in rules] + old

    def delete_jumps(self, family: int, chain: str, target: str, table: str = "filter") -> int:
        old = self.rules.get((family, chain, table), [])
        kept = [r for r in old if r.target != target]
        self.rules[(family, chain, table)] = kept
        return len(old) - len(kept)

    def listing(self, family: int, chain: str, table: str = "filter") -> list[ListedRule]:
        return list(self.rules.get((family, chain, table), []))


A4, A6 = ip_address("0.0.0.0"), ip_address("::")
G4 = ip_address("198.18.9.2")
LISTEN80 = GuestSocket(IPProto.TCP, A4, 80, A4, 0, "LISTEN", 1001, ())
CONN = GuestSocket(IPProto.TCP, G4, 40000, ip_address("198.18.9.1"), 2222, "ESTABLISHED", 1, ())


def test_blocked_sets_are_swapped_in_atomically() -> None:
    sets = FakeSets()
    fw = Firewall(ListingBackend(), sets)
    fw.set_blocked(9, socket_entries(CONN))
    sets.ops.clear()
    fw.set_blocked(9, socket_entries(LISTEN80))
    ops = sets.ops
    wanted = (("0.0.0.0/1", (80, 6)), ("128.0.0.0/1", (80, 6)))
    assert ("add", "xfgate-9-port4-new", wanted) in ops
    assert ("add", "xfgate-9-flow4-new", ()) in ops
    # The live set is never flushed or added to: it changes only by the swap.
    assert not any(
        op in ("flush", "add", "delete") and name == "xfgate-9-port4" for op, name, _ in ops
    )
    swap = ops.index(("swap", "xfgate-9-port4-new xfgate-9-port4", ()))
    assert swap > ops.index(("add", "xfgate-9-port4-new", wanted))
    assert ops.index(("destroy", "xfgate-9-port4-new", ())) > swap
    names = ["xfgate-9-flow4", "xfgate-9-flow6", "xfgate-9-port4", "xfgate-9-port6"]
    assert sets.names() == names  # no staging set left
    assert len(fw.blocked(9)) == 2


def test_a_starting_gate_adopts_the_jumps_a_stopped_one_left() -> None:
    class Counting(ListingBackend):
        deleted = 0

        def delete_jumps(self, family: int, chain: str, target: str, table: str = "filter") -> int:
            self.deleted += 1
            return super().delete_jumps(family, chain, target, table)

    backend = Counting()
    fw = Firewall(backend, FakeSets())
    fw.install(GateLayout(9, ("vif9.0",), 109))
    first = backend.deleted
    fw.install(GateLayout(9, ("vif9.0",), 109))  # the same jumps: kept, never deleted
    assert backend.deleted == first
    assert len(backend.listing(4, "FORWARD")) == 2
    fw.install(GateLayout(9, ("vif9.0", "vif9.1"), 109))  # another vif list: replaced
    assert backend.deleted > first and len(backend.listing(6, "FORWARD")) == 4


def test_remove_destroys_sets_and_resets_both_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    deleted: list[tuple[int, int]] = []
    monkeypatch.setattr(fastpath, "delete_conntrack_marked", lambda m, k: deleted.append((m, k)))
    sets, backend = FakeSets(), ListingBackend()
    fw = Firewall(backend, sets)
    layout = GateLayout(9, ("vif9.0",), 109)
    fw.install(layout)
    fw.set_blocked(9, socket_entries(LISTEN80))
    sets.create("xfgate-9-flow6-new", BITMAP_PORT)  # a gate killed mid-swap
    sets.create("xfgate-9-udp", BITMAP_PORT)  # an older gate's bitmap:port set
    sets.create("xfgate-10-port4", BITMAP_PORT)  # another domain's
    assert fw.leftover_domains() == {9, 10}
    fw.remove(9, persist_blocks=True)
    assert "xfgate-9-port4" in sets.names() and deleted == [
        (settle_mark(9, True), MARK_MASK),
        (settle_mark(9, False), MARK_MASK),
    ]
    fw.remove(9)
    assert sets.names() == ["xfgate-10-port4"]
    assert not [c for c in backend.rules if c[1].startswith("XFGATE-9")]


def test_counters_come_from_the_rules_counters() -> None:
    backend = ListingBackend()
    layout = GateLayout(9, ("vif9.0",), 109)
    counts = {"ACCEPT": 0, "DROP": 0}
    for family, factor in ((4, 1), (6, 10)):
        listed = []
        for rule in queue_rules(layout):
            target = rule[rule.index("-j") + 1]
            packets = {"ACCEPT": 5, "DROP": 3, "NFQUEUE": 7}.get(target, 100) * factor
            if "connmark" not in rule and target in counts:
                packets = 1000  # the mark (NF_REPEAT) rules do not count as fast path
            listed.append(ListedRule(rule, packets, packets * 60))
        backend.rules[(family, chain_name(9), "filter")] = listed
        backend.rules[(family, block_chain_name(9), "filter")] = [
            ListedRule(r, 2 * factor, 0) for r in block_rules(9, ["vif9.0"], family)
        ]
        backend.rules[(family, listener_chain_name(9), "filter")] = [
            ListedRule(r, 9 * factor, 0) for r in listener_rules(9, ["vif9.0"], family)[1:]
        ]
    assert Firewall(backend, FakeSets()).counters(9) == {
        "fastpath_accept": 55,
        "fastpath_drop": 33,
        "set_drop": 4 * 2 * 11,
        "queued": 77,
        "listener_accept": 99,
    }


def test_render_rule_is_iptables_save_verbose_shape() -> None:
    spec = ("-p", "tcp", "-m", "physdev", "--physdev-out", "vif9.0", "-m", "tcp")
    rule = ListedRule((*spec, "--dport", "9000", "-j", "DROP"), 3, 180)
    assert render_rule("XFGATE-9-POLL", rule) == (
        "-A XFGATE-9-POLL -p tcp -m physdev --physdev-out vif9.0 -m tcp --dport 9000"
        " -c 3 180 -j DROP"
    )
    assert render_rule("C", ListedRule(("-m", "mark"))) == "-A C -m mark -c 0 0"


def test_unknown_namespace_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        enter_netns("xfgate-no-such-namespace-h3")
    enter_netns("")  # stays where it is


# --- the real kernel, in a fresh network namespace ------------------------------------------


def _cli(*argv: str) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30).stdout


def _add_conntrack(family: int, sport: int, mark: int) -> None:
    from pyroute2 import NFCTSocket
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    src, dst = (
        ("198.18.9.1", "198.18.9.2") if family == socket.AF_INET else ("2001:2::1", "2001:2::2")
    )
    ct = NFCTSocket(nfgen_family=family)
    try:
        ct.entry(
            "add",
            timeout=300,
            mark=mark,
            tuple_orig=NFCTAttrTuple(family, src, dst, 17, sport, 53),
            tuple_reply=NFCTAttrTuple(family, dst, src, 17, 53, sport),
        )
    finally:
        ct.close()


def _probe() -> dict[str, Any]:
    """Run inside a fresh network namespace; returns what the adapters and the CLIs saw."""
    out: dict[str, Any] = {}
    sets = PyrouteSets()
    sets.create("xfgate-9-tcp", BITMAP_PORT)
    sets.create("xfgate-9-tcp", BITMAP_PORT)  # exists: left as it is
    sets.add("xfgate-9-tcp", BITMAP_PORT, [80, 65535, 1, 80])
    sets.delete("xfgate-9-tcp", BITMAP_PORT, [1])
    out["members"] = sets.members("xfgate-9-tcp", BITMAP_PORT)
    out["cli_members"] = _cli("ipset", "list", "xfgate-9-tcp").partition("Members:\n")[2].split()
    subprocess.run(["ipset", "create", "cli-set", "bitmap:port", "range", "0-65535"], check=True)
    headers = _cli("ipset", "list", "-t").split("\n\n")
    out["headers"] = [
        [ln for ln in h.splitlines() if ln.split(":")[0] in ("Type", "Revision", "Header")]
        for h in headers
        if h.strip()
    ]
    sets.create("xfgate-9-tcp-new", BITMAP_PORT)
    sets.add("xfgate-9-tcp-new", BITMAP_PORT, [22])
    sets.swap("xfgate-9-tcp-new", "xfgate-9-tcp")
    out["swapped"] = sets.members("xfgate-9-tcp", BITMAP_PORT)
    sets.flush("xfgate-9-tcp-new")
    out["flushed"] = sets.members("xfgate-9-tcp-new", BITMAP_PORT)
    sets.destroy("xfgate-9-tcp-new")
    sets.destroy("xfgate-9-tcp-new")  # absent: not an error
    out["absent_members"] = sets.members("xfgate-9-tcp-new", BITMAP_PORT)
    out["names"] = sets.names()

    marks = {1000: settle_mark(9, True), 1001: settle_mark(9, False), 1002: settle_mark(10, True)}
    marks[1003] = 0
    for family in (socket.AF_INET, socket.AF_INET6):
        for sport, mark in marks.items():
            _add_conntrack(family, sport, mark)
    delete_conntrack_marked(settle_mark(9, True), MARK_MASK)
    delete_conntrack_marked(settle_mark(9, False), MARK_MASK)
    delete_conntrack_marked(settle_mark(11, False), MARK_MASK)  # nothing matches
    left = _cli("conntrack", "-L", "-f", "ipv4") + _cli("conntrack", "-L", "-f", "ipv6")
    out["conntrack_sports"] = sorted(
        int(w.split("=")[1]) for w in left.split() if w.startswith("sport=") and w != "sport=53"
    )

    backend = IptcBackend()
    layout = GateLayout(9, ("vif9.0",), 109)
    fw = Firewall(backend, sets)
    fw.install(layout)
    out["save_error"] = fw.install_save(layout)
    listed = {
        f"{family} {chain}": [list(r.spec) for r in backend.listing(family, chain)]
        for family in (4, 6)
        for chain in ("FORWARD", chain_name(9), block_chain_name(9), listener_chain_name(9))
    }
    out["listed"] = listed
    out["rendered"] = fw.dump(9)
    out["cli"] = {
        key: [
            ln
            for ln in _cli(prog, "-w", "5", *table, "-S", chain.split()[-1], "-v").splitlines()
            if ln.startswith("-A")
        ]
        for key in out["rendered"]
        for prog in ["iptables-legacy" if key.startswith("ipv4") else "ip6tables-legacy"]
        for table, chain in [(["-t", "mangle"] if "mangle" in key else [], key)]
    }
    fw.set_blocked(9, socket_entries(CONN))
    fw.set_blocked(9, [e for s in ORACLE_SOCKETS for e in socket_entries(s)])
    out["blocked"] = fw.blocked(9)
    out["cli_blocked"] = sorted(
        m
        for name in ("port4", "flow4", "port6", "flow6")
        for m in _cli("ipset", "list", f"xfgate-9-{name}").partition("Members:\n")[2].split()
    )
    _probe_blocked_differences(fw, out)
    out["cli_types"] = [
        ln for ln in _cli("ipset", "list", "-t").splitlines() if ln.startswith(("Name", "Type"))
    ]
    granted = socket_entries(LISTEN80)
    fw.set_listeners(9, granted)
    fw.set_listeners(9, granted[:1], gone=granted)  # one renewed, the other deleted at once
    out["granted"] = fw.granted(9)
    out["cli_granted"] = _cli("ipset", "list", "xfgate-9-lsn4")
    fw.revoke_listeners(9)
    out["revoked"] = fw.granted(9)
    _probe_batched_renewals(fw, out)
    out["leftovers"] = sorted(fw.leftover_domains())
    out["jumps_deleted"] = backend.delete_jumps(4, "FORWARD", chain_name(9))
    out["jumps_deleted_again"] = backend.delete_jumps(4, "FORWARD", chain_name(9))
    fw.remove(9)
    out["after_remove"] = sorted(fw.leftover_domains())
    out["chains_after"] = [c for c in backend.chains(4) if c.startswith("XFGATE")]
    out["nft"] = nft_tables()
    out["lo"] = ifindex("lo")
    try:
        ifindex("vif-nope")
        out["missing_vif"] = "no error"
    except ConfigError as e:
        out["missing_vif"] = str(e)
    return out


def _members(name: str) -> list[str]:
    listing = _cli("ipset", "list", name).partition("Members:\n")[2]
    return sorted(ln.split()[0] for ln in listing.splitlines() if ln.strip())


def _probe_blocked_differences(fw: Firewall, out: dict[str, Any]) -> None:
    """set_blocked with `applied` (the gate's refresher): after the first fill, changes go as
    differences over the kept link (both set types, both families); a set changed behind
    the gate's back makes the link refuse, and the next call swaps it whole."""
    entries = [e for s in ORACLE_SOCKETS for e in socket_entries(s)]
    more = socket_entries(CONN) + socket_entries(
        GuestSocket(IPProto.TCP, A6, 443, A6, 0, "LISTEN", 1001, (), v6only=True)
    )
    applied: dict[str, frozenset[Any]] = {}
    fw.set_blocked(9, entries, applied)
    fw.set_blocked(9, entries[2:] + more, applied)  # 2 port entries out, a flow and 2 in
    out["diff_blocked"] = fw.blocked(9)
    out["diff_cli"] = sorted(
        m
        for name in ("port4", "flow4", "port6", "flow6")
        for m in _cli("ipset", "list", f"xfgate-9-{name}").partition("Members:\n")[2].split()
    )
    out["diff_want"] = sorted(str(e) for e in set(entries[2:] + more))
    out["diff_link"] = fw.link_stats(9, "blk")
    subprocess.run(["ipset", "flush", "xfgate-9-flow4"], check=True)  # behind the gate's back
    subprocess.run(["ipset", "flush", "xfgate-9-port6"], check=True)
    fw.set_blocked(9, entries, applied)  # differences only: what was flushed stays out
    out["diff_drifted"] = fw.blocked(9)
    applied.clear()  # the refresher's periodic whole rewrite (RESWAP_SECONDS)
    fw.set_blocked(9, entries, applied)
    out["diff_repaired"] = fw.blocked(9)
    fw.set_blocked(9, entries)  # as the rest of the probe expects


def _probe_batched_renewals(fw: Firewall, out: dict[str, Any]) -> None:
    """The keeper's kept link (ipset_wire): several entries of both families per send, a
    renewal restarts the 1 s timeout of the renewed entries only, a refusal reopens."""
    import time

    from xfgate.verdict.blocksets import BlockEntry

    tcp = IPProto.TCP
    v4 = [BlockEntry(4, tcp, p, n) for p in (22, 80) for n in ("0.0.0.0/1", "128.0.0.0/1")]
    v4.append(BlockEntry(4, tcp, 9000, "198.18.9.2"))
    v6 = [BlockEntry(6, tcp, 8080, "::/1"), BlockEntry(6, tcp, 9000, "2001:2:0:9::2")]
    before = fw.listener_link_stats(9)
    fw.set_listeners(9, v4 + v6)
    out["batch_members"] = _members("xfgate-9-lsn4") + _members("xfgate-9-lsn6")
    after = fw.listener_link_stats(9)
    out["batch_cost"] = {k: after[k] - before.get(k, 0) for k in ("sends", "requests", "entries")}
    time.sleep(0.5)
    fw.set_listeners(9, v4[:2] + v6[:1], gone=v4[4:])  # renew 3, delete 1 at once, 3 lapse
    out["after_delete"] = _members("xfgate-9-lsn4")
    time.sleep(0.7)  # 1.2 s after the first add: the entries not renewed have timed out
    out["renewed_only"] = _members("xfgate-9-lsn4") + _members("xfgate-9-lsn6")
    try:
        fw.set_listeners(8, v4[:1])  # domain 8 has no sets: refused
        out["refused"] = "no error"
    except FirewallError as e:
        out["refused"] = str(e)
    fw.set_listeners(9, v4[:1])
    out["after_refusal"] = _members("xfgate-9-lsn4")
    out["link_8"] = fw.listener_link_stats(8)


ORACLE_SOCKETS = [
    LISTEN80,
    GuestSocket(IPProto.TCP, A6, 8080, A6, 0, "LISTEN", 1001, (), v6only=True),
    GuestSocket(IPProto.UDP, G4, 53, A4, 0, "CLOSE", 1001, ()),
    GuestSocket(
        IPProto.UDPLITE,
        ip_address("2001:2:0:9::2"),
        41000,
        ip_address("2001:2:0:9::1"),
        9,
        "ESTABLISHED",
        1001,
        (),
    ),
]
ORACLE_MEMBERS = sorted(
    [
        "0.0.0.0/1,tcp:80",
        "128.0.0.0/1,tcp:80",
        "198.18.9.2,udp:53",
        "::/1,tcp:8080",
        "8000::/1,tcp:8080",
        "2001:2:0:9::2,udplite:41000,2001:2:0:9::1",
    ]
)


@pytest.fixture(scope="module")
def probed() -> dict[str, Any]:
    return probe_in_fresh_netns("tests.test_verdict_nfnetlink")


class TestInAFreshNamespace:
    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        pytest.mark.netns,
        pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and netfilter"),
        pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)"),
    ]

    def test_ipsets_match_the_ipset_tool(self, probed: dict[str, Any]) -> None:
        assert probed["members"] == [80, 65535]
        assert probed["cli_members"] == ["80", "65535"]
        # Created like `ipset create NAME bitmap:port range 0-65535`: same type, revision and
        # header, no family (one set serves IPv4 and IPv6 rules).
        assert len(probed["headers"]) == 2 and probed["headers"][0] == probed["headers"][1]
        assert probed["headers"][0] == ["Type: bitmap:port", "Revision: 3", "Header: range 0-65535"]
        assert probed["swapped"] == [22] and probed["flushed"] == []
        assert probed["absent_members"] == [] and probed["names"] == ["cli-set", "xfgate-9-tcp"]

    def test_conntrack_delete_takes_only_the_domains_marks(self, probed: dict[str, Any]) -> None:
        # Domain 9's accept and drop entries are gone in both families; domain 10's and the
        # unmarked ones stay.
        assert probed["conntrack_sports"] == [1002, 1002, 1003, 1003]

    def test_rules_read_back_as_written_and_as_iptables_lists_them(
        self, probed: dict[str, Any]
    ) -> None:
        layout = GateLayout(9, ("vif9.0",), 109)
        for family in (4, 6):
            listed = probed["listed"]
            assert listed[f"{family} {chain_name(9)}"] == [list(r) for r in queue_rules(layout)]
            assert listed[f"{family} {block_chain_name(9)}"] == [
                list(r) for r in block_rules(9, ["vif9.0"], family)
            ]
            assert listed[f"{family} {listener_chain_name(9)}"] == [
                list(r) for r in listener_rules(9, ["vif9.0"], family)
            ]
            assert listed[f"{family} FORWARD"] == [
                list(r) for r in fastpath.forward_jumps(9, ["vif9.0"])
            ]
        assert probed["save_error"] is None
        assert set(probed["rendered"]) == {
            f"ipv{f} {c}"
            for f in (4, 6)
            for c in ("XFGATE-9", "XFGATE-9-BLK", "XFGATE-9-LSN", "mangle XFGATE-9-SAVE")
        }
        assert probed["rendered"] == probed["cli"]  # the CLI as oracle, counters included
        # The ipset program as oracle: what the adapter wrote and lists is what ipset lists.
        assert sorted(probed["blocked"]) == sorted(probed["cli_blocked"]) == ORACLE_MEMBERS
        assert "Type: hash:net,port" in probed["cli_types"]
        assert "Type: hash:ip,port,ip" in probed["cli_types"]

    def test_granted_listener_sets_time_out_and_renew(self, probed: dict[str, Any]) -> None:
        # Entries live GRANT_TTL (1 s) unless renewed; a renewal or a deletion is immediate.
        assert probed["granted"] == ["0.0.0.0/1,tcp:80"]
        assert "timeout 1" in probed["cli_granted"].split("Header:")[1].splitlines()[0]
        assert "0.0.0.0/1,tcp:80 timeout" in probed["cli_granted"]
        assert probed["revoked"] == []
        assert probed["leftovers"] == [9]
        assert probed["jumps_deleted"] == 2 and probed["jumps_deleted_again"] == 0
        assert probed["after_remove"] == [] and probed["chains_after"] == []

    def test_blocked_set_differences_read_back_with_the_ipset_tool(
        self, probed: dict[str, Any]
    ) -> None:
        assert sorted(probed["diff_blocked"]) == probed["diff_want"] == probed["diff_cli"]
        assert "2001:2:0:9::2,udplite:41000,2001:2:0:9::1" in probed["diff_cli"]
        assert "198.18.9.2,tcp:40000,198.18.9.1" in probed["diff_cli"]
        # One send for the four changed sets: additions then deletions, a request each.
        assert probed["diff_link"]["sends"] == 1 and probed["diff_link"]["errors"] == 0
        assert sorted(probed["diff_drifted"]) != ORACLE_MEMBERS  # a difference does not repair
        assert sorted(probed["diff_repaired"]) == ORACLE_MEMBERS  # a whole rewrite does

    def test_batched_renewals_read_back_with_the_ipset_tool(self, probed: dict[str, Any]) -> None:
        # One send, one request per family, every entry in it; `ipset list` as the oracle.
        assert probed["batch_cost"] == {"sends": 1, "requests": 2, "entries": 7}
        v4 = ["0.0.0.0/1,tcp:22", "128.0.0.0/1,tcp:22", "0.0.0.0/1,tcp:80", "128.0.0.0/1,tcp:80"]
        v4.append("198.18.9.2,tcp:9000")
        v6 = ["::/1,tcp:8080", "2001:2:0:9::2,tcp:9000"]
        assert probed["batch_members"] == sorted(v4) + sorted(v6)
        assert "198.18.9.2,tcp:9000" not in probed["after_delete"]  # deleted at once
        # Renewed entries live on; the others lapsed with their 1 s timeout.
        assert probed["renewed_only"] == ["0.0.0.0/1,tcp:22", "128.0.0.0/1,tcp:22", "::/1,tcp:8080"]
        assert "ipset refused" in probed["refused"] and "error 2" in probed["refused"]
        assert probed["after_refusal"] == probed["renewed_only"][:2]
        assert probed["link_8"]["errors"] == 1 and probed["link_8"]["opens"] == 1

    def test_nft_tables_and_links(self, probed: dict[str, Any]) -> None:
        assert probed["nft"] == []  # a fresh namespace has no nftables tables
        assert probed["lo"] == 1
        assert "not found in this network namespace" in probed["missing_vif"]


if __name__ == "__main__":
    print(json.dumps(_probe()))
