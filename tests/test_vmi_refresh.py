"""Incremental refreshes (GuestIntrospector.refresh_view, Refresher): nothing re-decoded at rest,
what changed decoded again, blocked owners read afresh, and the periodic full walk catching
what a refresh reused wrongly (a planted disagreement). Fakes here; tests/test_crowd_lab.py runs
the same on the crowded lab guest."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any, cast

from tests.vmi_fakes import (
    FakeGuest,
    fake_domain,
    lports_of,
    spray_and_web,
    view_from_scratch,
)
from xfgate.flow import Flow, GuestView, Owner
from xfgate.inet import IPProto
from xfgate.verdict.blocksets import blocked_entries
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine, LockedOwnerSource
from xfgate.verdict.policy import Verdict, compile_policy, decide
from xfgate.verdict.runner import Refresher
from xfgate.vmi.introspect import GuestIntrospector


def resetting_refresher(gi: GuestIntrospector) -> tuple[Refresher, Engine, list[int]]:
    """A refresher of the gate's kind over `gi`, policy `--block-uid 1001`, sets applied nowhere:
    it, its engine and the list its settled-flow resets append to."""
    source = LockedOwnerSource(gi)
    engine = Engine(1, {}, source, compile_policy(uids=[1001]), OwnerCache())
    resets: list[int] = []
    r = Refresher(1, source, engine, lambda e: None, 0.01, reset_settled=lambda: resets.append(1))
    return r, engine, resets


def _blocked_1001(owner: Owner) -> bool:
    return owner.uid == 1001


def test_a_refresh_at_rest_decodes_nothing_and_hands_back_the_same_view() -> None:
    g, spray, _web, _ = spray_and_web()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        first = gi.refresh_view()  # no complete walk yet: a full one
        assert first.complete and gi.crosscheck.full_walks == 1
        for _ in range(3):
            assert gi.refresh_view() is first
        cc = gi.crosscheck
        assert (cc.full_walks, cc.refreshes, cc.refresh_unchanged) == (1, 3, 3)
        counts = cc.last_refresh
        assert counts["tasks_decoded"] == counts["tables_decoded"] == 0
        assert counts["files_resolved"] == counts["changes"] == 0
        assert counts["tables_reused"] >= 2
        # One new socket: that table decoded again, nothing else; still no full walk.
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40001, "198.18.0.1", 53, sk_uid=1001)
        g.add_fd(spray, 9, sk)
        view = gi.refresh_view()
        assert view is not first and view.complete and 40001 in lports_of(view, 400)
        assert view == view_from_scratch(gi)  # built from the old view: the same as from scratch
        counts = gi.crosscheck.last_refresh
        assert counts["tables_decoded"] == 1 and counts["files_resolved"] == 1
        g.put_fd(g.task_at(spray).fd_array, 9, 0)  # closed again
        view = gi.refresh_view()
        assert 40001 not in lports_of(view, 400) and view == view_from_scratch(gi)
        assert gi.crosscheck.full_walks == 1


def test_blocked_owners_are_read_afresh_and_the_full_walk_catches_a_planted_disagreement() -> None:
    """A bind() after the walk changes a sock, not the fd array: a refresh reuses the old
    decode for an owner it does not watch (stale until the full walk, which counts and repairs
    the disagreement), and sees it at once for a watched (blocked) owner."""
    g, spray, _web, lsk = spray_and_web()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        gi.refresh_view(_blocked_1001)
        num = g.off("sock_common", "skc_num")
        g.w(lsk + num, "<H", 8081)  # web (uid 1000, not watched) rebinds in place
        spray_sk = _sock_at(g, spray, 3)
        g.w(spray_sk + num, "<H", 33001)  # spray (uid 1001, watched) too
        view = gi.refresh_view(_blocked_1001)
        assert lports_of(view, 400) == {33001}  # watched: read afresh
        assert view == view_from_scratch(gi)
        assert lports_of(view, 500) == {8080}  # not watched: the reused (planted stale) decode
        assert gi.crosscheck.refresh_disagreements == 0
        gi.crosscheck_seconds = 0  # the periodic full walk is due
        view = gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.full_walks == 2
        assert gi.crosscheck.refresh_disagreements == 1  # counted ...
        assert lports_of(view, 500) == {8081}  # ... and repaired
        gi.crosscheck_seconds = 3600
        assert lports_of(gi.refresh_view(_blocked_1001), 500) == {8081}


def _sock_at(g: FakeGuest, task: int, fd: int) -> int:
    """The struct sock behind `fd` of `task`'s table (file -> socket -> sk)."""
    file = g.read_q(g.task_at(task).fd_array + fd * 8)
    socket = g.read_q(file + g.off("file", "private_data"))
    return g.read_q(socket + g.off("socket", "sk"))


class _Counting(LockedOwnerSource):
    """Counts full walks (view) through the lock."""

    def __init__(self, source: GuestIntrospector) -> None:
        super().__init__(source)
        self.views = 0

    def view(self, timeout: float | None = None) -> GuestView:
        self.views += 1
        return super().view(timeout)


def test_the_refresher_at_rest_does_no_full_walk_and_recomputes_no_set() -> None:
    g, _spray, _web, _ = spray_and_web()
    gi = GuestIntrospector(fake_domain(), g.profile, memory=g.memory)
    source = _Counting(gi)
    engine = Engine(1, {}, source, compile_policy(uids=[1001]), OwnerCache())
    applied: list[set[Any]] = []
    r = Refresher(1, source, engine, applied.append, 0.01)
    r.refresh_once(walk=True)
    assert len(applied) == 1 and 33000 in {e.port for e in applied[0]}
    facts = engine.facts
    for _ in range(5):
        r.refresh_once()
    assert gi.crosscheck.full_walks == 1 and gi.crosscheck.refreshes == 5
    assert r.unchanged == 5 and engine.facts is facts and len(applied) == 1
    assert source.views == 0  # never the full view() path of the lock either
    # A change: the sets follow, judged again only for what changed, as from scratch.
    sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40001, "198.18.0.1", 53, sk_uid=1001)
    g.add_fd(_spray, 9, sk)
    r.refresh_once()
    assert len(applied) == 2 and 40001 in {e.port for e in applied[1]}
    assert applied[1] == blocked_entries(engine.facts.sockets, engine.policy, engine.facts)
    # The full walk, when due, runs without holding the source's lock.
    gi.crosscheck_seconds = 0
    held: list[bool] = []
    run = gi.run_full_walk

    def spy(plan: Any) -> Any:
        free = source._lock.acquire(blocking=False)
        if free:
            source._lock.release()
        held.append(not free)
        return run(plan)

    gi.run_full_walk = cast(Any, spy)  # type: ignore[method-assign]
    r.refresh_once()
    assert held == [False] and gi.crosscheck.full_walks == 2
    gi.close()


def test_the_resolver_stops_at_the_first_blocked_holder_and_never_settles_an_accept() -> None:
    """A new sock held by web (uid 1000) and spray (uid 1001, blocked): with the blocked owners
    watched, spray's table is searched first and ends the search (a drop needs one); the answer
    says the holders are not all known, so the policy drops and could never settle an accept."""
    g, spray, web, _ = spray_and_web()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory, min_rewalk_seconds=60) as gi:
        gi.refresh_view(_blocked_1001)
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40001, "198.18.0.1", 53, sk_uid=1000)
        g.hash_udp(sk, 40001)
        file = g.add_fd(web, 9, sk)
        g.put_fd(g.task_at(spray).fd_array, 7, file)
        flow = Flow(IPProto.UDP, ip_address("198.18.1.1"), 40001, ip_address("198.18.0.1"), 53)
        own = gi.lookup(flow)
        assert own is not None and [o.pid for o in own.owners] == [400]
        assert not own.holders_known
        assert decide(own, flow, compile_policy(uids=[1001])).verdict is Verdict.DROP
        gi.watch = None  # nobody blocked: every table searched, all holders known
        gi._boot.owners.pop(sk, None)  # type: ignore[union-attr]
        own = gi.lookup(flow)
        assert own is not None and own.holders_known
        assert [o.pid for o in own.owners] == [400, 500]


def test_a_connection_whose_holder_becomes_blocked_makes_settled_flows_be_decided_again() -> None:
    """uid 1000's web holds an established connection (settled as accepted, the settled-accept
    rule before the sets); web then drops to the blocked uid 1001. The refresher sees the
    connection's owner blocked: its flow entry joins the sets and the domain's settled flows
    are reset, so the connection's next packet meets the set. New blocked sockets (a flood)
    never reset anything."""
    g, spray, web, _ = spray_and_web()
    conn = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 8080, "198.18.0.1", 45000, sk_uid=1000)
    g.add_fd(web, 5, conn)
    gi = GuestIntrospector(fake_domain(), g.profile, memory=g.memory)
    r, _engine, resets = resetting_refresher(gi)
    r.refresh_once(walk=True)
    sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33001, "198.18.0.1", 2222, sk_uid=1001)
    g.add_fd(spray, 4, sk)  # the blocked owner's new connection: no reset
    r.refresh_once()
    assert resets == [] and 33001 in {e.port for e in r.entries or set()}
    cred = g.alloc(0x60)
    g.w(cred + g.off("cred", "uid"), "<I", 1001)
    g.w(cred + g.off("cred", "euid"), "<I", 1001)
    g.w(web + g.off("task_struct", "real_cred"), "<QQ", cred, cred)
    r.refresh_once()
    assert resets == [1] and r.settled_resets == 1
    assert any(e.port == 8080 and e.is_flow for e in r.entries or set())
    gi.close()


def test_a_blocked_owners_socket_on_a_good_connections_port_resets_nothing() -> None:
    """A flood reuses local ports: uid 1001's new socket on the local port and peer address of
    uid 1000's connection (another remote port, another sock) has the same set entry (the flow
    sets carry no remote port). Only the same connection turning blocked resets the domain's
    settled flows; before, this reset every one of them, the good service's included."""
    g, spray, web, _ = spray_and_web()
    conn = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 33002, "198.18.0.1", 2222, sk_uid=1000)
    g.add_fd(web, 5, conn)
    gi = GuestIntrospector(fake_domain(), g.profile, memory=g.memory)
    r, _engine, resets = resetting_refresher(gi)
    r.refresh_once(walk=True)
    assert not any(e.port == 33002 for e in r.entries or set())
    sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33002, "198.18.0.1", 2223, sk_uid=1001)
    g.add_fd(spray, 6, sk)
    r.refresh_once()
    assert any(e.port == 33002 and e.is_flow for e in r.entries or set())  # blocked in the sets
    assert resets == [] and r.settled_resets == 0
    gi.close()
