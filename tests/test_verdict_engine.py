"""The engine on fake packets: exactly one verdict, always; marks; the log."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import pytest
from scapy.layers.inet import IP, TCP

from tests.verdict_fakes import VIF, FakePacket
from xfgate.flow import Flow, GuestSocket, GuestView, Owner, Ownership, Via
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine, LockedOwnerSource
from xfgate.verdict.fastpath import (
    MARK_MASK,
    settle_mark,
)
from xfgate.verdict.log import VerdictLog
from xfgate.verdict.policy import compile_policy

G, C = "198.18.9.2", "198.18.9.1"
SPRAY = Owner(300, 1001, 1001, "spray")
WEB = Owner(200, 1000, 1000, "httpd")


class TableSource:
    def __init__(self, table: dict[int, Ownership], fail: int = 0) -> None:
        self.table = table  # by guest port
        self.lookups = 0
        self.fail = fail
        self.gen = 1

    def lookup(self, flow: Flow) -> Ownership | None:
        self.lookups += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("torn list")
        return self.table.get(flow.lport)

    def sockets(self) -> Sequence[GuestSocket]:
        return []

    def view(self) -> GuestView:
        return GuestView((), (), (), complete=True)

    def generation(self) -> int:
        return self.gen


def engine(
    policy_kw: dict[str, Any], source: TableSource, fastpath: bool = True
) -> tuple[Engine, io.StringIO]:
    out = io.StringIO()
    e = Engine(
        9,
        {VIF: "vif9.0"},
        source,
        compile_policy(**policy_kw),
        OwnerCache(),
        VerdictLog(out, flush_every=1),
        fastpath=fastpath,
    )
    return e, out


def syn(sport: int, dport: int) -> bytes:
    return bytes(IP(src=G, dst=C) / TCP(sport=sport, dport=dport, flags="S"))


SOURCE_TABLE = {
    40000: Ownership((SPRAY,), 1001, "SYN_SENT", Via.ESTABLISHED),
    8080: Ownership((WEB,), 1000, "LISTEN", Via.LISTENER),
}


def test_with_the_save_chain_accepts_carry_the_mark_without_repeat_drops_still_repeat() -> None:
    e, _ = engine({"uids": [1001]}, TableSource(SOURCE_TABLE))
    e.save_in_postrouting = True
    accepted = inbound(50000, 8080)
    e.handle(accepted)
    assert accepted.verdicts == ["accept"]
    assert accepted.mark & MARK_MASK == settle_mark(9, accept=True)
    dropped = FakePacket(syn(40000, 2222))
    e.handle(dropped)
    assert dropped.verdicts == ["repeat"]
    assert dropped.mark & MARK_MASK == settle_mark(9, accept=False)
    assert e.stats.settled == 2


def test_blocked_flow_is_marked_drop_and_repeated() -> None:
    e, out = engine({"uids": [1001]}, TableSource(SOURCE_TABLE))
    p = FakePacket(syn(40000, 2222))
    e.handle(p)
    assert p.verdicts == ["repeat"]
    assert p.mark & MARK_MASK == settle_mark(9, accept=False)
    rec = json.loads(out.getvalue().splitlines()[-1])
    assert (rec["verdict"], rec["pid"], rec["uid"], rec["comm"]) == ("drop", 300, 1001, "spray")
    assert (rec["source"], rec["direction"], rec["vif"], rec["settled"]) == (
        "introspection",
        "out",
        "vif9.0",
        True,
    )


def test_second_packet_of_a_flow_is_a_cache_hit() -> None:
    src = TableSource(SOURCE_TABLE)
    e, out = engine({"uids": [1001]}, src, fastpath=False)
    for _ in range(3):
        p = FakePacket(bytes(IP(src=C, dst=G) / TCP(sport=5000, dport=8080)), 3, VIF)
        e.handle(p)
        assert p.verdicts == ["accept"]
    assert src.lookups == 1
    sources = [json.loads(line)["source"] for line in out.getvalue().splitlines()]
    assert sources == ["introspection", "cache", "cache"]


def test_unknown_owner_uses_the_default_and_is_not_settled() -> None:
    e, out = engine({"uids": [1001], "unknown": "drop"}, TableSource({}))
    p = FakePacket(bytes(IP(src=G, dst=C) / TCP(sport=41000, dport=9999, flags="A")))
    e.handle(p)
    assert p.verdicts == ["drop"] and p.mark == 0
    assert "unknown owner" in json.loads(out.getvalue())["reason"]


def test_malformed_and_foreign_packets_get_one_verdict() -> None:
    e, out = engine({"unknown": "accept"}, TableSource({}))
    for pkt in (FakePacket(b"\x45\x00"), FakePacket(syn(1, 2), 55, 56), FakePacket(b"")):
        e.handle(pkt)
        assert pkt.verdicts == ["accept"]
    reasons = [json.loads(line)["reason"] for line in out.getvalue().splitlines()]
    assert "malformed" in reasons[0] and "not on a vif" in reasons[1]


def test_lookup_errors_are_retried_once_then_the_error_verdict() -> None:
    src = TableSource(SOURCE_TABLE, fail=1)
    e, _ = engine({"uids": [1001]}, src)
    p = FakePacket(syn(40000, 2222))
    e.handle(p)
    assert p.verdicts == ["repeat"] and src.lookups == 2  # retried, then decided
    src2 = TableSource(SOURCE_TABLE, fail=5)
    e2, out2 = engine({"uids": [1001], "unknown": "drop"}, src2)
    p2 = FakePacket(syn(40000, 2222))
    e2.handle(p2)
    assert p2.verdicts == ["drop"] and e2.stats.errors == 1
    assert "internal error" in json.loads(out2.getvalue())["reason"]


def test_a_packet_that_comes_back_marked_is_not_repeated_again() -> None:
    e, _ = engine({"uids": [1001]}, TableSource(SOURCE_TABLE))
    p = FakePacket(syn(40000, 2222))
    p.mark = settle_mark(9, accept=False)
    e.handle(p)
    assert p.verdicts == ["drop"]


def test_verdict_failure_is_counted_not_raised() -> None:
    class Refusing(FakePacket):
        def repeat(self) -> None:
            raise RuntimeError("Parent queue has already been unbound")

    e, _ = engine({}, TableSource(SOURCE_TABLE))
    refused = Refusing(syn(40000, 2222))
    e.handle(refused)
    assert e.stats.verdict_failures == 1 and e.stats.packets == 1
    assert refused.verdicts == ["accept"]  # the settling repeat failed: a plain verdict instead


def test_generation_change_empties_the_cache() -> None:
    src = TableSource(SOURCE_TABLE)
    e, _ = engine({}, src, fastpath=False)
    e.handle(FakePacket(syn(40000, 2222)))
    e.handle(FakePacket(syn(40000, 2222)))
    src.gen = 2
    e.handle(FakePacket(syn(40000, 2222)))
    assert src.lookups == 2


def test_policy_swap_applies_to_the_next_packet() -> None:
    e, _ = engine({}, TableSource(SOURCE_TABLE), fastpath=False)
    p1 = FakePacket(syn(40000, 2222))
    e.handle(p1)
    e.set_policy(e.policy.changed("block", "comm", "spray"))
    p2 = FakePacket(syn(40000, 2222))
    e.handle(p2)
    assert (p1.verdicts, p2.verdicts) == (["accept"], ["drop"])


def test_log_sampling_keeps_drops() -> None:
    out = io.StringIO()
    log = VerdictLog(out, sample=10, flush_every=1)
    for i in range(30):
        log.record({"i": i, "verdict": "accept"})
    log.record({"verdict": "drop"}, always=True)
    log.flush()
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x.get("i") for x in lines] == [0, 10, 20, None]


# --- incoming SYNs: one lookup per listener, not per connection ----------------------------


class SynSource(TableSource):
    """A guest with listeners by port, per-5-tuple sockets by (lport, rport), and a
    listener-only lookup (what GuestIntrospector offers for SYNs meeting TIME_WAIT)."""

    def __init__(
        self,
        listeners: dict[int, Ownership],
        connections: dict[tuple[int, int], Ownership] | None = None,
    ) -> None:
        super().__init__(listeners)
        self.connections = connections or {}
        self.listener_lookups = 0

    def lookup(self, flow: Flow) -> Ownership | None:
        self.lookups += 1
        own = self.connections.get((flow.lport, flow.rport))
        return own if own is not None else self.table.get(flow.lport)

    def lookup_listener(self, flow: Flow) -> Ownership | None:
        self.listener_lookups += 1
        return self.table.get(flow.lport)


def inbound(sport: int, dport: int, flags: str = "S", client: str = C) -> FakePacket:
    return FakePacket(
        bytes(IP(src=client, dst=G) / TCP(sport=sport, dport=dport, flags=flags)), 3, VIF
    )


def test_hundred_syns_from_distinct_client_ports_cost_one_lookup() -> None:
    src = SynSource({8080: SOURCE_TABLE[8080]})
    e, out = engine({"uids": [1001]}, src)
    for port in range(30000, 30100):
        p = inbound(port, 8080)
        e.handle(p)
        assert p.verdicts == ["repeat"] and p.mark & MARK_MASK == settle_mark(9, accept=True)
    assert src.lookups == 1
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["source"] for r in recs] == ["introspection"] + ["cache"] * 99
    assert {(r["pid"], r["comm"], r["via"]) for r in recs} == {(200, "httpd", Via.LISTENER)}
    # Another client address finds the same listener entry; another port is another service.
    e.handle(inbound(40000, 8080, client="198.18.9.77"))
    assert src.lookups == 1
    e.handle(inbound(40001, 8081))
    assert src.lookups == 2


def test_syn_cache_serves_only_syns_and_keeps_blocking_the_listener_owner() -> None:
    src = SynSource({8080: SOURCE_TABLE[8080]})
    e, _ = engine({"uids": [1000]}, src)
    for port in (30000, 30001):
        p = inbound(port, 8080)
        e.handle(p)
        assert p.mark & MARK_MASK == settle_mark(9, accept=False)
    assert src.lookups == 1
    # An ACK of a connection, a SYN-ACK leaving the guest: still per 5-tuple.
    e.handle(inbound(30000, 8080, flags="A"))
    e.handle(FakePacket(bytes(IP(src=G, dst=C) / TCP(sport=8080, dport=30001, flags="SA"))))
    assert src.lookups == 3


def test_policy_and_generation_changes_drop_the_listener_entry() -> None:
    src = SynSource({8080: SOURCE_TABLE[8080]})
    e, _ = engine({}, src)
    e.handle(inbound(30000, 8080))
    e.handle(inbound(30001, 8080))
    assert src.lookups == 1
    e.set_policy(compile_policy(uids=[1000]))
    p = inbound(30002, 8080)
    e.handle(p)
    assert src.lookups == 2 and p.mark & MARK_MASK == settle_mark(9, accept=False)
    src.gen += 1  # the guest rebooted
    e.handle(inbound(30003, 8080))
    assert src.lookups == 3


def test_no_listener_is_cached_only_briefly() -> None:
    src = SynSource({})
    now = [100.0]
    e = Engine(9, {VIF: "vif9.0"}, src, compile_policy(), OwnerCache(timer=lambda: now[0]))
    e.handle(inbound(30000, 9999))
    e.handle(inbound(30001, 9999))
    assert src.lookups == 1
    now[0] += 1.5  # past the negative TTL (1 s), inside the positive one (10 s)
    src.table[9999] = SOURCE_TABLE[8080]  # a service started listening
    p = inbound(30002, 9999)
    e.handle(p)
    assert src.lookups == 2 and p.verdicts == ["repeat"]


@pytest.mark.parametrize("locked", [False, True])
def test_syn_meeting_time_wait_goes_to_the_listener(locked: bool) -> None:
    tw = Ownership((), -1, "TIME_WAIT", Via.TIME_WAIT)
    src = SynSource({8080: SOURCE_TABLE[8080]}, {(8080, 30000): tw})
    out = io.StringIO()
    e = Engine(
        9,
        {VIF: "vif9.0"},
        LockedOwnerSource(src) if locked else src,
        compile_policy(uids=[1000]),
        OwnerCache(),
        VerdictLog(out, flush_every=1),
    )
    p = inbound(30000, 8080)
    e.handle(p)
    assert src.listener_lookups == 1
    assert p.mark & MARK_MASK == settle_mark(9, accept=False)  # the listener's owner is blocked
    rec = json.loads(out.getvalue().splitlines()[-1])
    assert (rec["pid"], rec["via"]) == (200, "time-wait->listener")
    e.handle(inbound(30001, 8080))  # a fresh client port: the listener entry answers
    assert src.lookups == 1


def test_syn_meeting_a_connection_is_cached_per_connection() -> None:
    # A simultaneous open: the guest's own connecting socket receives the SYN.
    sent = Ownership((SPRAY,), 1001, "SYN_SENT", Via.ESTABLISHED)
    src = SynSource({8080: SOURCE_TABLE[8080]}, {(8080, 30000): sent})
    e, _ = engine({"uids": [1001]}, src)
    p = inbound(30000, 8080)
    e.handle(p)
    assert p.mark & MARK_MASK == settle_mark(9, accept=False)
    p = inbound(30001, 8080)  # not that connection: the listener, looked up anew
    e.handle(p)
    assert p.mark & MARK_MASK == settle_mark(9, accept=True)
    assert src.lookups == 2
    e.handle(inbound(30002, 8080))
    assert src.lookups == 2


def test_syn_time_wait_without_listener_lookup_stays_unknown() -> None:
    # A source without lookup_listener (e.g. the owners-json one): the old answer, not cached long.
    tw = Ownership((), -1, "TIME_WAIT", Via.TIME_WAIT)

    class Plain(TableSource):
        def lookup(self, flow: Flow) -> Ownership | None:
            self.lookups += 1
            return tw

    src = Plain({})
    e, out = engine({}, src)
    e.handle(inbound(30000, 8080))
    rec = json.loads(out.getvalue().splitlines()[-1])
    assert rec["via"] == "time-wait" and rec["pid"] is None


class DegradedSource(TableSource):
    """A source whose profile lacks what targeted lookups need (GuestIntrospector.degraded)."""

    def degraded(self) -> str:
        return "socket hash lookups off (no inet_ehash_secret)"


def test_a_degraded_source_is_said_and_its_unknowns_are_never_settled() -> None:
    src = DegradedSource(SOURCE_TABLE)
    assert LockedOwnerSource(src).degraded() == src.degraded()
    assert LockedOwnerSource(TableSource({})).degraded() == ""
    e, out = engine({"uids": [1001], "unknown": "accept"}, src)
    assert e.degraded == src.degraded()
    p = inbound(50000, 9999)  # nothing listens there in the last walk
    e.handle(p)
    assert p.verdicts == ["accept"] and p.mark & MARK_MASK == 0  # accepted, not settled
    rec = json.loads(out.getvalue().splitlines()[-1])
    assert "socket hash lookups off" in rec["reason"] and rec["settled"] is False
    known = inbound(50001, 8080)  # found (in the walk): decided and settled as usual
    e.handle(known)
    assert known.mark & MARK_MASK == settle_mark(9, accept=True)
    assert e.stats.settled == 1


def test_status_names_a_degraded_source_first_whatever_the_walks_say() -> None:
    from xfgate.config import DomainConfig, MemoryConfig
    from xfgate.verdict.fastpath import GateLayout
    from xfgate.verdict.runner import DomainGate, _degraded

    cfg = DomainConfig(9, "fake", ("vif9.0",), MemoryConfig("raw", "/nonexistent"))
    for src, want in ((DegradedSource({}), "socket hash lookups off"), (TableSource({}), "")):
        e, _ = engine({}, src)
        dg = DomainGate(cfg, GateLayout(9, ("vif9.0",), 109), LockedOwnerSource(src), e)
        assert _degraded(dg).startswith(want) and bool(_degraded(dg)) == bool(want)


def test_a_syn_whose_socket_is_gone_is_dropped_while_a_block_is_in_force() -> None:
    # connect() then close() before the SYN's turn in the queue: no socket names anyone. A
    # flood does it by the thousand; before, these SYNs took --unknown (accept) and got out.
    e, out = engine({"uids": [1001]}, TableSource({}))
    p = FakePacket(syn(41000, 9999))
    e.handle(p)
    assert p.verdicts == ["drop"] and p.mark == 0  # unsettled
    assert "SYN of no guest socket" in json.loads(out.getvalue())["reason"]
    # Nothing blocked: nothing to protect, --unknown as before; a kernel RST still passes.
    e2, _ = engine({}, TableSource({}))
    p2 = FakePacket(syn(41000, 9999))
    e2.handle(p2)
    assert p2.verdicts == ["accept"]
    rst = FakePacket(bytes(IP(src=G, dst=C) / TCP(sport=41000, dport=9999, flags="R")))
    e.handle(rst)
    assert rst.verdicts == ["accept"]


class BusySource(TableSource):
    def lookup(self, flow: Flow) -> Ownership | None:
        raise TimeoutError("owner source busy for more than 50 ms")


def test_a_syn_whose_lookup_timed_out_is_dropped_while_a_block_is_in_force() -> None:
    # The red team's fd bomb: a walk held the source, the SYN's lookup timed out, the last
    # view did not know the new socket: --unknown let 2 SYNs out. Now dropped, unsettled.
    e, out = engine({"uids": [1001]}, BusySource({}))
    p = FakePacket(syn(41000, 2305))
    e.handle(p)
    assert p.verdicts == ["drop"] and p.mark == 0
    assert "not in the last view while a block is in force" in json.loads(out.getvalue())["reason"]
    # Not a SYN (a datagram, an ACK): no socket of the last view names it either, and a block
    # is in force: dropped, unsettled (it may be the blocked owner's newest socket).
    ack = FakePacket(bytes(IP(src=G, dst=C) / TCP(sport=41000, dport=2305, flags="A")))
    e.handle(ack)
    assert ack.verdicts == ["drop"] and ack.mark == 0
    e2, _ = engine({}, BusySource({}))
    p2 = FakePacket(syn(41000, 2305))
    e2.handle(p2)
    assert p2.verdicts == ["accept"]
