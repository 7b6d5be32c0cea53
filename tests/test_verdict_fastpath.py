"""The fast path's pure rule builders (chains, jumps, marks) and the firewall's failure
handling, without touching the kernel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from xfgate.errors import FirewallError
from xfgate.inet import IPProto
from xfgate.verdict.fastpath import (
    MARK_MASK,
    Firewall,
    GateLayout,
    ListedRule,
    block_rules,
    domain_of_chain,
    forward_jumps,
    poll_rules,
    postrouting_jumps,
    queue_rules,
    save_rules,
    settle_mark,
    settled_marks,
)


def test_chain_layout() -> None:
    layout = GateLayout(9, ("vif9.0",), 109, queue_bypass=True)
    jumps = forward_jumps(9, layout.vifs)
    assert jumps == [
        ("-m", "physdev", "--physdev-in", "vif9.0", "--physdev-is-bridged", "-j", "XFGATE-9"),
        ("-m", "physdev", "--physdev-out", "vif9.0", "--physdev-is-bridged", "-j", "XFGATE-9"),
    ]
    rules = queue_rules(layout)
    # A settled accept first: the sets only see packets not already settled accept.
    assert rules[0][:2] == ("-m", "connmark") and rules[0][-1] == "ACCEPT"
    assert rules[1] == ("-j", "XFGATE-9-BLK")
    assert rules[-1] == ("-j", "NFQUEUE", "--queue-num", "109", "--queue-bypass")
    assert any("CONNMARK" in r for r in rules)
    no_fast = queue_rules(GateLayout(9, ("vif9.0",), 109, fastpath=False))
    assert no_fast == [("-j", "XFGATE-9-BLK"), ("-j", "NFQUEUE", "--queue-num", "109")]


def test_save_chain_stores_only_accept_marks_and_is_reached_both_ways() -> None:
    assert domain_of_chain("XFGATE-9-SAVE") == 9
    assert postrouting_jumps(9, ("vif9.0", "vif9.1")) == [
        ("-m", "physdev", f"--physdev-{way}", vif, "--physdev-is-bridged", "-j", "XFGATE-9-SAVE")
        for vif in ("vif9.0", "vif9.1")
        for way in ("in", "out")
    ]
    (rule,) = save_rules(9)
    assert rule[:4] == ("-m", "mark", "--mark", f"{settle_mark(9, True):#x}/{MARK_MASK:#x}")
    assert rule[4:7] == ("-j", "CONNMARK", "--save-mark")


class NoMangleBackend:
    """Filter works, the mangle table does not (a kernel without iptable_mangle)."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def _call(self, op: str, chain: str, table: str) -> None:
        self.calls.append((op, chain, table))
        if table == "mangle" and op != "delete_jumps":
            raise FirewallError(f"iptables -t mangle: table does not exist ({op} {chain})")

    def chains(self, family: int, table: str = "filter") -> list[str]:
        self._call("chains", "", table)
        return []

    def ensure_chain(self, family: int, chain: str, table: str = "filter") -> None:
        self._call("ensure_chain", chain, table)

    def replace_rules(
        self, family: int, chain: str, rules: Sequence[Any], table: str = "filter"
    ) -> None:
        self._call("replace_rules", chain, table)

    def delete_chain(self, family: int, chain: str, table: str = "filter") -> None:
        self._call("delete_chain", chain, table)

    def insert_rules(
        self, family: int, chain: str, rules: Sequence[Any], table: str = "filter"
    ) -> None:
        self._call("insert_rules", chain, table)

    def delete_jumps(self, family: int, chain: str, target: str, table: str = "filter") -> int:
        self._call("delete_jumps", chain, table)
        return 0

    def listing(self, family: int, chain: str, table: str = "filter") -> list[ListedRule]:
        self._call("listing", chain, table)
        return []


def test_save_chain_failure_is_reported_and_cleaned_not_raised() -> None:
    backend = NoMangleBackend()
    fw = Firewall(backend)
    why = fw.install_save(GateLayout(9, ("vif9.0",), 109))
    assert why is not None and "mangle" in why
    # It tried to undo its part (jumps first) for both families, and nothing else.
    undo = [c for c in backend.calls if c[0] == "delete_jumps"]
    assert undo == [("delete_jumps", "POSTROUTING", "mangle")] * 2
    assert all(table == "mangle" for _, _, table in backend.calls)


def test_marks_are_per_domain_and_verdict() -> None:
    marks = {settle_mark(d, a) for d in (1, 2) for a in (True, False)}
    assert len(marks) == 4 and all(m & ~MARK_MASK == 0 for m in marks)
    assert (0x60000, 0x3FFF0000) in settled_marks(1)
    assert settled_marks(1) == [
        (settle_mark(1, True), MARK_MASK),
        (settle_mark(1, False), MARK_MASK),
    ]


def test_block_and_poll_rules() -> None:
    rules = block_rules(9, ["vif9.0"], 6)
    assert len(rules) == 4 and all(r[-2:] == ("-j", "DROP") for r in rules)
    assert [r[-4:-2] for r in rules] == [
        ("xfgate-9-port6", "src,src"),
        ("xfgate-9-flow6", "src,src,dst"),
        ("xfgate-9-port6", "dst,dst"),
        ("xfgate-9-flow6", "dst,dst,src"),
    ]
    assert [r[3] for r in rules] == ["vif9.0"] * 4 and rules[0][2] == "--physdev-in"
    polls = poll_rules(["vif9.0"], [(IPProto.TCP, 80), (IPProto.TCP, 80), (17, 53)])
    assert len(polls) == 4  # no duplicate for the repeated port
    assert polls[0][-4:-2] == ("--sport", "80") and polls[1][-4:-2] == ("--dport", "80")


def test_chain_names_round_trip() -> None:
    assert domain_of_chain("XFGATE-12-BLK") == 12 and domain_of_chain("XFGATE-3") == 3
    assert domain_of_chain("DOCKER") is None and domain_of_chain("XFGATE-x") is None


def test_not_root_is_refused_before_anything_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    from xfgate.errors import PrerequisiteError
    from xfgate.verdict import fastpath

    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(PrerequisiteError, match="needs root"):
        fastpath.check_prerequisites()


class CountingSets:
    """A SetAdapter that records which sets were swapped (filled) and what its kept link sent."""

    def __init__(self) -> None:
        self.swapped: list[str] = []
        self.sent: list[list[tuple[str, str, tuple[Any, ...]]]] = []
        self.refuse = False

    def session(self) -> Any:
        import contextlib

        return contextlib.nullcontext(self)

    def swap(self, a: str, b: str) -> None:
        self.swapped.append(b)

    def link(self) -> Any:
        from xfgate.verdict.ipset_wire import LinkStats

        outer = self

        class Link:
            stats = LinkStats()

            def apply(self, changes: Any) -> None:
                if outer.refuse:
                    raise FirewallError("ipset refused: seq 1: error 2")
                outer.sent.append([(c.op, c.name, c.entries) for c in changes if c.entries])

            def close(self) -> None:
                pass

        return Link()

    def __getattr__(self, name: str) -> Any:
        return lambda *args: []


def test_set_blocked_fills_only_the_sets_whose_members_changed() -> None:
    from xfgate.verdict.blocksets import BlockEntry

    sets = CountingSets()
    fw = Firewall(NoMangleBackend(), sets)  # type: ignore[arg-type]
    flow = BlockEntry(4, IPProto.TCP, 33000, "198.18.1.1", "198.18.0.1")
    port = BlockEntry(4, IPProto.UDP, 5353, "0.0.0.0/1")
    applied: dict[str, Any] = {}
    fw.set_blocked(1, [flow, port], applied)
    assert len(sets.swapped) == 4 and sets.sent == []  # the first time: every set swapped
    sets.swapped.clear()
    fw.set_blocked(1, [flow, port], applied)
    assert sets.swapped == [] and sets.sent == []  # nothing changed: no netlink request
    new = BlockEntry(4, IPProto.TCP, 33001, "198.18.1.1", "198.18.0.1")
    fw.set_blocked(1, [new, port], applied)
    # Only the flow set of that family, as a difference in one send: the addition first.
    assert sets.swapped == []
    assert sets.sent == [
        [
            ("add", "xfgate-1-flow4", (("198.18.1.1", (33001, 6), "198.18.0.1"),)),
            ("del", "xfgate-1-flow4", (("198.18.1.1", (33000, 6), "198.18.0.1"),)),
        ]
    ]
    assert applied["xfgate-1-flow4"] == frozenset([new])
    fw.set_blocked(1, [flow, port])  # without `applied`: every set swapped, as before
    assert len(sets.swapped) == 4


def test_a_refused_difference_makes_the_next_write_whole() -> None:
    from xfgate.verdict.blocksets import BlockEntry

    sets = CountingSets()
    fw = Firewall(NoMangleBackend(), sets)  # type: ignore[arg-type]
    flow = BlockEntry(4, IPProto.TCP, 33000, "198.18.1.1", "198.18.0.1")
    applied: dict[str, Any] = {}
    fw.set_blocked(1, [flow], applied)
    sets.swapped.clear()
    sets.refuse = True
    with pytest.raises(FirewallError):
        fw.set_blocked(1, [], applied)
    assert "xfgate-1-flow4" not in applied  # the kernel's content is not known any more
    sets.refuse = False
    fw.set_blocked(1, [], applied)
    assert sets.swapped == ["xfgate-1-flow4"] and applied["xfgate-1-flow4"] == frozenset()


def test_a_difference_larger_than_one_message_is_swapped_whole() -> None:
    from xfgate.verdict.blocksets import BlockEntry
    from xfgate.verdict.ipset_wire import MAX_ENTRIES

    sets = CountingSets()
    fw = Firewall(NoMangleBackend(), sets)  # type: ignore[arg-type]
    applied: dict[str, Any] = {}
    fw.set_blocked(1, [], applied)
    sets.swapped.clear()
    burst = [
        BlockEntry(4, IPProto.TCP, 20000 + i, "198.18.1.1", "198.18.0.1")
        for i in range(MAX_ENTRIES + 1)
    ]
    fw.set_blocked(1, burst, applied)
    assert sets.swapped == ["xfgate-1-flow4"] and sets.sent == []
    fw.set_blocked(1, burst[1:], applied)  # a small difference again: over the link
    assert sets.sent == [[("del", "xfgate-1-flow4", (("198.18.1.1", (20000, 6), "198.18.0.1"),))]]
