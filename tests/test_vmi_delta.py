"""Views that say what changed (flow.ViewDelta): an incremental view's delta is exactly what
differs from the view before (by object), a watched owner's sockets decoded again and the same
are the old objects, an index rebuild hands on no new objects, and the refresher following the
deltas judges what a from-scratch judgement would, its periodic whole-view check catching a
delta that lies. Fakes; tests/test_crowd_lab.py runs the gate on the crowded lab guest."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tests.vmi_fakes import fake_domain, lports_of, spray_and_web, view_from_scratch
from xfgate.flow import GuestView, Owner, ViewDelta
from xfgate.inet import IPProto
from xfgate.verdict import runner
from xfgate.verdict.blocksets import BlockEntry, blocked_entries
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine, LockedOwnerSource
from xfgate.verdict.policy import compile_policy
from xfgate.verdict.runner import Refresher
from xfgate.vmi.introspect import GuestIntrospector


def _blocked_1001(owner: Owner) -> bool:
    return owner.uid == 1001


def _ids(view: GuestView) -> set[int]:
    return {id(g) for g in view.sockets}


def _follows(old: GuestView, new: GuestView) -> ViewDelta:
    """new's delta, checked against old: exactly the objects that differ."""
    d = new.delta
    assert d is not None and d.base == old.serial and new.serial > old.serial
    assert {id(g) for g in d.removed} == _ids(old) - _ids(new)
    assert {id(g) for g in d.added} == _ids(new) - _ids(old)
    return d


def test_a_views_delta_is_what_changed_and_unchanged_sockets_stay_the_same_objects() -> None:
    g, spray, web, _ = spray_and_web()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        view = gi.refresh_view(_blocked_1001)
        assert view.serial == 1 and view.delta is None  # the first: from nothing
        udp, tcp = IPProto.UDP, IPProto.TCP
        steps: list[Callable[[], object]] = [
            lambda: None,  # the watched spray read afresh: the same decode, no change
            lambda: g.add_fd(spray, 9, g.new_sock(udp, 7, "198.18.1.1", 40001, "198.18.0.1", 53)),
            lambda: g.add_fd(web, 7, g.new_sock(tcp, 10, "0.0.0.0", 8081, "0.0.0.0", 0)),
            lambda: g.put_fd(g.task_at(spray).fd_array, 9, 0),
            lambda: g.add_fd(spray, 10, g.new_sock(tcp, 1, "198.18.1.1", 40002, "198.18.0.1", 80)),
        ]
        sizes = []
        for step in steps:
            step()
            new = gi.refresh_view(_blocked_1001)
            assert new == view_from_scratch(gi)
            if new is view:  # nothing changed: the same view
                sizes.append((0, 0))
                continue
            d = _follows(view, new)
            sizes.append((len(d.added), len(d.removed)))
            view = new
        assert sizes == [(0, 0), (1, 0), (1, 0), (0, 1), (1, 0)]
        assert 40002 in lports_of(view, 400) and 8081 in lports_of(view, 500)
        # An index rebuilt from scratch (every index_rebuild_seconds): the same objects.
        gi.index_rebuild_seconds = 0
        g.add_fd(web, 8, g.new_sock(IPProto.UDP, 7, "0.0.0.0", 5353, "0.0.0.0", 0))
        new = gi.refresh_view(_blocked_1001)
        d = _follows(view, new)
        assert [s.lport for s in d.added] == [5353] and d.removed == ()
        assert new == view_from_scratch(gi)
        # A full walk too.
        gi.crosscheck_seconds = 0
        again = gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.full_walks == 2
        d = _follows(new, again)
        assert d.added == d.removed == () and _ids(again) == _ids(new)


def _refresher(gi: GuestIntrospector) -> tuple[Refresher, Engine, list[set[BlockEntry]]]:
    source = LockedOwnerSource(gi)
    engine = Engine(1, {}, source, compile_policy(uids=[1001]), OwnerCache())
    applied: list[set[BlockEntry]] = []
    return Refresher(1, source, engine, applied.append, 0.01), engine, applied


def test_the_refresher_follows_the_deltas_and_judges_as_from_scratch() -> None:
    g, spray, web, _ = spray_and_web()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        r, engine, _applied = _refresher(gi)
        r.refresh_once(walk=True)
        first = r.sockets_judged
        assert first == len(engine.facts.sockets)
        port = 40100
        for n in range(6):
            holder, uid = (spray, 1001) if n % 2 == 0 else (web, 1000)
            sk = g.new_sock(IPProto.TCP, 1, "198.18.1.1", port + n, "198.18.0.1", 80, sk_uid=uid)
            g.add_fd(holder, 20 + n, sk)
            if n == 4:
                g.put_fd(g.task_at(spray).fd_array, 20, 0)
            r.refresh_once()
            facts = engine.facts
            assert r.entries == blocked_entries(facts.sockets, engine.policy, facts)
            assert set(r._entry_cache) == {id(s) for s in facts.sockets}
        assert r.entries_by_delta == 6 and r.entries_disagreements == 0
        assert r.sockets_judged == first + 6  # then only the one new socket each time


def test_a_delta_that_lies_is_caught_by_the_whole_view_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    g, spray, _web, _ = spray_and_web()
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        r, engine, _applied = _refresher(gi)
        r.refresh_once(walk=True)
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40001, "198.18.0.1", 53, sk_uid=1001)
        g.add_fd(spray, 9, sk)
        view = gi.refresh_view(_blocked_1001)
        assert view.delta is not None and len(view.delta.added) == 1
        lie = dataclasses.replace(view, delta=ViewDelta(view.delta.base, (), ()))
        facts = engine.absorb_view(lie)
        serial = r._entries_serial
        missed = r._entries(facts, engine.policy, lie)  # followed: the new socket is missed
        assert 40001 not in {e.port for e in missed} and r.entries_disagreements == 0
        r._entries_serial = serial  # the same again, now at a check
        monkeypatch.setattr(runner, "ENTRIES_CHECK_SECONDS", 0.0)
        found = r._entries(facts, engine.policy, lie)
        assert 40001 in {e.port for e in found}
        assert r.entries_disagreements == 1 and r.entries_rechecked == 1
        assert found == blocked_entries(facts.sockets, engine.policy, facts)


def test_a_connection_handed_to_a_blocked_owner_resets_settled_flows_through_the_delta() -> None:
    """uid 1000's web holds a connection (settled as accepted); it passes the fd to the
    blocked spray and closes its own. The refresher, following the view's delta (its port
    index and the removed sockets as the view before), sees the same connection blocked now
    and has the settled flows decided again; as the whole-view comparison did."""
    g, spray, web, _ = spray_and_web()
    conn = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 8080, "198.18.0.1", 45000, sk_uid=1000)
    g.add_fd(web, 5, conn)
    with GuestIntrospector(fake_domain(), g.profile, memory=g.memory) as gi:
        source = LockedOwnerSource(gi)
        engine = Engine(1, {}, source, compile_policy(uids=[1001]), OwnerCache())
        resets: list[int] = []
        r = Refresher(
            1, source, engine, lambda e: None, 0.01, reset_settled=lambda: resets.append(1)
        )
        r.refresh_once(walk=True)
        g.add_fd(spray, 4, g.new_sock(IPProto.TCP, 1, "198.18.1.1", 33001, "198.18.0.1", 22))
        r.refresh_once()
        assert resets == [] and r.entries_by_delta == 1
        g.add_fd(spray, 5, conn)
        g.put_fd(g.task_at(web).fd_array, 5, 0)
        r.refresh_once()
        assert r.entries_by_delta == 2 and r._cache_prev is not None  # the delta's path
        assert resets == [1] and any(e.port == 8080 and e.is_flow for e in r.entries or set())
