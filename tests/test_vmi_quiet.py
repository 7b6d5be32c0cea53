"""Quiet refreshes (GuestIntrospector.refresh_view on a kernel with `total_forks`/`nr_threads`):
the task list is not walked while no task forked or exited, only the watched (blocked) owners
and two rotating slices are read, the sliced cross-check replaces the periodic full walk.
Fakes here (tests/vmi_fakes.counters_profile); tests/test_crowd_lab.py runs the gate's
refreshes on the crowded lab guest."""

from __future__ import annotations

import random
from ipaddress import IPv4Address

import pytest

from tests.test_vmi_refresh import resetting_refresher
from tests.vmi_fakes import (
    FakeGuest,
    counters_profile,
    fake_domain,
    lports_of,
    spray_and_web,
    view_from_scratch,
)
from xfgate.flow import Owner
from xfgate.inet import IPProto
from xfgate.vmi.introspect import GuestIntrospector, rotating_slice
from xfgate.vmi.linux import (
    FdSocket,
    InetSock,
    Task,
    Walk,
    _not_held_by,
    _not_held_by_column,
    pid_column,
)

FOREVER = 1e9  # a slice period no test reaches: those refreshes read no slice at all
ALWAYS = 1e-9  # a slice period every refresh exceeds: all tasks in the slice


def _blocked_1001(owner: Owner) -> bool:
    return owner.uid == 1001


def _introspector(g: FakeGuest, read: float = FOREVER, check: float = FOREVER) -> GuestIntrospector:
    gi = GuestIntrospector(fake_domain(), g.profile, memory=g.memory)
    gi.read_seconds, gi.check_seconds = read, check
    return gi


def _sock_at(g: FakeGuest, task: int, fd: int) -> int:
    file = g.read_q(g.task_at(task).fd_array + fd * 8)
    socket = g.read_q(file + g.off("file", "private_data"))
    return g.read_q(socket + g.off("socket", "sk"))


def test_at_rest_the_task_list_is_not_walked_and_only_watched_owners_are_read() -> None:
    g, spray, _web, _ = spray_and_web(counters_profile())
    with _introspector(g) as gi:
        first = gi.refresh_view(_blocked_1001)  # the full walk: counters noted
        assert gi.counter_symbols is not None and gi.crosscheck.full_walks == 1
        for _ in range(3):
            assert gi.refresh_view(_blocked_1001) is first
        cc = gi.crosscheck
        assert (cc.refreshes, cc.quiet_refreshes, cc.refresh_unchanged) == (3, 3, 3)
        counts = cc.last_refresh
        tasks = len(first.tasks)
        # Only the watched owner (uid 1001: spray and the resolver of standard_guest) read.
        assert counts["tasks_trusted"] == tasks - 2 and counts["tasks_decoded"] == 2
        assert counts["tasks_rechecked"] == 0
        # The blocked owner's new socket: in the view at the next refresh, still quiet.
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40001, "198.18.0.1", 53, sk_uid=1001)
        g.add_fd(spray, 9, sk)
        view = gi.refresh_view(_blocked_1001)
        assert 40001 in lports_of(view, 400) and view == view_from_scratch(gi)
        assert cc.quiet_refreshes == 4 and cc.full_walks == 1
        g.put_fd(g.task_at(spray).fd_array, 9, 0)  # closed again
        view = gi.refresh_view(_blocked_1001)
        assert 40001 not in lports_of(view, 400) and view == view_from_scratch(gi)


def test_a_fork_or_an_exit_walks_the_task_list_and_a_blocked_child_is_watched() -> None:
    g, spray, web, _ = spray_and_web(counters_profile())
    with _introspector(g) as gi:
        gi.refresh_view(_blocked_1001)
        gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.quiet_refreshes == 1
        child = g.add_task(401, "spray", uid=1001, parent=spray)  # fork: counters move
        sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33001, "198.18.0.1", 2222, sk_uid=1001)
        g.add_fd(child, 3, sk)
        view = gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.quiet_refreshes == 1  # the list was walked
        assert lports_of(view, 401) == {33001} and view == view_from_scratch(gi)
        gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.quiet_refreshes == 2  # quiet again
        g.exit_task(web)
        view = gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.quiet_refreshes == 2
        assert 500 not in {t.pid for t in view.tasks} and lports_of(view, 500) == set()
        assert view == view_from_scratch(gi) and gi.crosscheck.full_walks == 1


def test_a_setuid_is_found_by_the_read_slice_within_its_period() -> None:
    """web (uid 1000, not watched) becomes uid 1001 without a fork: no counter moves. The read
    slice reads its task_struct within `read_seconds`; it is then watched (read afresh)."""
    g, _spray, web, _ = spray_and_web(counters_profile())
    with _introspector(g) as gi:
        gi.refresh_view(_blocked_1001)
        cred = g.alloc(0x60)
        g.w(cred + g.off("cred", "uid"), "<I", 1001)
        g.w(cred + g.off("cred", "euid"), "<I", 1001)
        g.w(web + g.off("task_struct", "real_cred"), "<QQ", cred, cred)
        view = gi.refresh_view(_blocked_1001)  # the slice's period not reached: not seen yet
        assert {t.uid for t in view.tasks if t.pid == 500} == {1000}
        gi.read_seconds = ALWAYS
        view = gi.refresh_view(_blocked_1001)
        assert {t.uid for t in view.tasks if t.pid == 500} == {1001}
        assert {o.uid for s in view.sockets for o in s.owners if o.pid == 500} == {1001}
        assert view == view_from_scratch(gi) and gi.crosscheck.full_walks == 1


def test_the_sliced_cross_check_catches_and_repairs_a_planted_disagreement() -> None:
    """A bind() in place (fd array unchanged) by a task nobody watches: the refreshes reuse the
    old decode until the cross-check slice decodes that task afresh, counts, repairs; never a
    full walk."""
    g, _spray, _web, lsk = spray_and_web(counters_profile())
    with _introspector(g) as gi:
        gi.refresh_view(_blocked_1001)
        g.w(lsk + g.off("sock_common", "skc_num"), "<H", 8081)
        view = gi.refresh_view(_blocked_1001)
        assert lports_of(view, 500) == {8080}  # stale: reused
        assert gi.crosscheck.refresh_disagreements == 0
        gi.check_seconds = ALWAYS  # every task in the next slice
        view = gi.refresh_view(_blocked_1001)
        cc = gi.crosscheck
        assert cc.refresh_disagreements == 1 and cc.slice_checked > 0  # counted ...
        assert lports_of(view, 500) == {8081} and view == view_from_scratch(gi)  # ... and repaired
        assert cc.full_walks == 1 and cc.quiet_refreshes == 2


def test_a_task_that_is_not_itself_any_more_makes_an_incomplete_view_that_changes_nothing() -> None:
    """Hostile or torn memory: a known task_struct shows another pid while no counter moved.
    The quiet refresh is incomplete (adds nothing wrong, replaces nothing); the next one walks
    the task list."""
    g, spray, _web, _ = spray_and_web(counters_profile())
    with _introspector(g, read=ALWAYS) as gi:
        before = gi.refresh_view(_blocked_1001)
        g.w(spray + g.off("task_struct", "pid"), "<i", 999)
        view = gi.refresh_view(_blocked_1001)
        assert not view.complete and view.problems
        g.w(spray + g.off("task_struct", "pid"), "<i", 400)
        again = gi.refresh_view(_blocked_1001)
        assert again.complete and again == before
        assert gi.crosscheck.quiet_refreshes == 1  # the failed one; the next walked the list


def test_rotating_slices_cover_every_task_once_per_period() -> None:
    addrs = tuple(range(100, 110))
    cursor, debt, seen = 0, 0.0, []
    for _ in range(5):  # period 10 s, a refresh every 2 s: 2 tasks each
        chosen, cursor, debt = rotating_slice(addrs, cursor, debt, 2.0, 10.0)
        assert len(chosen) == 2
        seen += sorted(chosen)
    assert sorted(seen) == list(addrs)
    # Fractions carry over; a long gap reads everything once, never more.
    part, cursor, debt = rotating_slice(addrs, 0, 0.0, 0.5, 10.0)
    assert part == frozenset() and debt == 0.5
    part, cursor, debt = rotating_slice(addrs, cursor, debt, 0.5, 10.0)
    assert part == {100} and debt == 0.0
    assert rotating_slice(addrs, 3, 0.0, 1e6, 10.0)[0] == frozenset(addrs)
    assert rotating_slice((), 3, 0.0, 2.0, 10.0) == (frozenset(), 0, 0.0)


def test_a_connection_made_unseen_then_its_holder_blocked_resets_the_settled_flows() -> None:
    """Quiet refreshes do not re-read web's (uid 1000, not watched) fd table: a connection
    it opens after the walk is not in the view (its flow may be settled as accepted by the
    packet path). web then drops to the blocked uid: the read slice finds it, it is watched,
    its connection joins the sets, and, since web was in the last view and not blocked, the
    settled flows are reset (the connection was never seen unblocked: the old rule missed
    it). The blocked spray's own new connections never reset anything."""
    g, spray, web, _ = spray_and_web(counters_profile())
    gi = _introspector(g)
    r, engine, resets = resetting_refresher(gi)
    r.refresh_once(walk=True)
    sk = g.new_sock(IPProto.TCP, 2, "198.18.1.1", 33001, "198.18.0.1", 2222, sk_uid=1001)
    g.add_fd(spray, 4, sk)
    r.refresh_once()
    assert resets == [] and 33001 in {e.port for e in r.entries or set()}
    conn = g.new_sock(IPProto.TCP, 1, "198.18.1.1", 8080, "198.18.0.1", 45000, sk_uid=1000)
    g.add_fd(web, 5, conn)
    r.refresh_once()
    assert gi.crosscheck.last_refresh["tasks_trusted"] > 0
    assert not any(s.rport == 45000 for s in engine.facts.sockets)  # not read: trusted
    cred = g.alloc(0x60)
    g.w(cred + g.off("cred", "uid"), "<I", 1001)
    g.w(cred + g.off("cred", "euid"), "<I", 1001)
    g.w(web + g.off("task_struct", "real_cred"), "<QQ", cred, cred)
    gi.read_seconds = ALWAYS
    r.refresh_once()
    assert any(e.port == 8080 and e.is_flow for e in r.entries or set())
    assert resets == [1] and r.settled_resets == 1
    gi.close()


def test_watched_tasks_are_taken_from_the_prior_refresh_and_a_newly_watched_one_stays_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the same watch function, a quiet refresh does not ask of every task whether it
    is watched: the prior refresh's watched tasks are read, the others are its Task objects
    (not watched). A task that becomes watched (a setuid seen by the read slice) is recorded
    and read afresh on every later refresh: its new socket is in the next view."""
    asked: list[int] = []
    original = Walk.watched

    def counting(self: Walk, task: Task) -> bool:
        asked.append(task.pid)
        return original(self, task)

    monkeypatch.setattr(Walk, "watched", counting)
    g, _spray, web, _ = spray_and_web(counters_profile())
    with _introspector(g) as gi:
        gi.refresh_view(_blocked_1001)  # the full walk
        gi.refresh_view(_blocked_1001)  # the first quiet one asks of every task
        tasks = len(gi.refresh_view(_blocked_1001).tasks)
        asked.clear()
        gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.quiet_refreshes == 3
        assert 0 < len(set(asked)) < tasks and 500 not in asked  # web: not asked, not read
        cred = g.alloc(0x60)  # web becomes uid 1001 without a fork
        g.w(cred + g.off("cred", "uid"), "<I", 1001)
        g.w(cred + g.off("cred", "euid"), "<I", 1001)
        g.w(web + g.off("task_struct", "real_cred"), "<QQ", cred, cred)
        gi.read_seconds = ALWAYS
        gi.refresh_view(_blocked_1001)  # the read slice decodes it: watched
        gi.read_seconds = FOREVER
        gi.refresh_view(_blocked_1001)
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40002, "198.18.0.1", 53, sk_uid=1001)
        g.add_fd(web, 9, sk)  # no fork, no slice: only a watched task is read
        view = gi.refresh_view(_blocked_1001)
        assert 40002 in lports_of(view, 500) and view == view_from_scratch(gi)
        assert gi.crosscheck.full_walks == 1


def test_the_pid_column_drops_exactly_what_a_pass_over_every_entry_drops() -> None:
    """A quiet walk drops the redone thread groups' entries by searching the packed pid
    column: the same list, in the same order, as the pass over every entry, and the kept
    entries' column; groups contiguous or not, ids that are another id's bytes shifted."""
    rng = random.Random(10)
    sock = InetSock(0x1000, 4, 6, 10, IPv4Address(0), 80, IPv4Address(0), 0, 0)
    for n in range(300):
        pool = [1, 2, 3, 256, 257, 65536, 1 << 21, rng.randrange(1, 4_000_000)]
        entries = [FdSocket(rng.choice(pool), fd, sock) for fd in range(rng.randrange(0, 60))]
        if n % 2:  # each group's entries contiguous, as walks append them
            entries.sort(key=lambda e: e.pid)
        redone = set(rng.sample(pool, k=rng.randrange(0, 4))) | {rng.randrange(1, 9)}
        kept, column = _not_held_by_column(entries, pid_column(entries), redone)
        assert kept == _not_held_by(entries, redone)
        assert [id(e) for e in kept] == [id(e) for e in _not_held_by(entries, redone)]
        assert column == pid_column(kept)


def test_a_watched_owners_socket_is_decoded_again_only_when_its_bytes_changed() -> None:
    """A blocked owner's files are read on every refresh; one whose file, sk pointer and
    struct sock give the bytes of the last refresh is not decoded again. Any change shows
    at once: a connect() in place (same file, same sock: its state and ports), a file whose
    socket now points at another sock."""
    g, spray, _web, _ = spray_and_web(counters_profile())
    sk = _sock_at(g, spray, 3)
    with _introspector(g) as gi:
        gi.refresh_view(_blocked_1001)  # the full walk
        gi.refresh_view(_blocked_1001)  # decoded afresh, bytes kept
        view = gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.last_refresh["files_replayed"] >= 1
        assert lports_of(view, 400) == {33000} and view == view_from_scratch(gi)
        g.w(sk + g.off("sock_common", "skc_num"), "<H", 33001)  # in place, no fd change
        view = gi.refresh_view(_blocked_1001)
        assert lports_of(view, 400) == {33001} and view == view_from_scratch(gi)
        other = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40003, "198.18.0.1", 53, sk_uid=1001)
        file = g.read_q(g.task_at(spray).fd_array + 3 * 8)
        socket = g.read_q(file + g.off("file", "private_data"))
        g.w(socket + g.off("socket", "sk"), "<Q", other)  # the same file, another sock
        view = gi.refresh_view(_blocked_1001)
        assert lports_of(view, 400) == {40003} and view == view_from_scratch(gi)
        view = gi.refresh_view(_blocked_1001)
        assert gi.crosscheck.last_refresh["files_replayed"] >= 1 and lports_of(view, 400) == {40003}
        assert gi.crosscheck.full_walks == 1


def test_a_watched_owner_holding_what_it_held_is_not_a_changed_thread_group() -> None:
    """Read afresh every refresh, a blocked owner whose files gave the same socks keeps its
    prior entry objects and is not redone downstream; a new socket of another watched owner
    is (only that one)."""
    g, spray, _web, _ = spray_and_web(counters_profile())
    with _introspector(g) as gi:
        gi.refresh_view(_blocked_1001)
        gi.refresh_view(_blocked_1001)
        first = gi.refresh_view(_blocked_1001)
        resolver = next(t.address for t in g.tasks if t.pid == 300)
        assert lports_of(first, 400) == {33000}
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40004, "198.18.0.1", 53, sk_uid=1001)
        g.add_fd(resolver, 9, sk)
        view = gi.refresh_view(_blocked_1001)
        assert 40004 in lports_of(view, 300) and view == view_from_scratch(gi)
        walk = gi._boot.last_walk if gi._boot is not None else None
        assert walk is not None and walk.changed_pids == {300}
        assert view.delta is not None and [s.lport for s in view.delta.added] == [40004]
        assert lports_of(view, 400) == {33000} and spray
        # The cross-check slice decodes every task afresh: those whose socks decode the
        # same are not changed thread groups either (their entries stay the objects).
        gi.check_seconds = ALWAYS
        sk = g.new_sock(IPProto.UDP, 7, "198.18.1.1", 40005, "198.18.0.1", 53, sk_uid=1001)
        g.add_fd(resolver, 10, sk)
        view = gi.refresh_view(_blocked_1001)
        walk = gi._boot.last_walk if gi._boot is not None else None
        # (kthreadd, pid 2, has no file table: no entries to keep, still redone)
        assert walk is not None and walk.changed_pids == {2, 300}
        assert gi.crosscheck.last_refresh["tasks_rechecked"] == len(g.tasks)
        assert 40005 in lports_of(view, 300) and view == view_from_scratch(gi)
