"""The granted listeners' keeper (issue 9's flood, every repeat): renewals on their own thread,
never waiting for a walk, and grants carried through incomplete views for a bounded time.
Fakes here; under a real flood in test_verdict_netns.py and bench/flood.py."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address
from typing import Any, cast

from xfgate.flow import Flow, GuestSocket, GuestView, Owner, Ownership, Via
from xfgate.inet import IPProto
from xfgate.verdict.blocksets import BlockEntry
from xfgate.verdict.cache import OwnerCache
from xfgate.verdict.engine import Engine
from xfgate.verdict.listeners import CARRY_SECONDS, GRANT_TTL, KEEP_INTERVAL
from xfgate.verdict.policy import compile_policy
from xfgate.verdict.runner import ListenerSets, Refresher

ANY4 = IPv4Address(0)
WEB = Owner(200, 1000, 1000, "fastweb", fd=3)
LISTENER = GuestSocket(IPProto.TCP, ANY4, 8000, ANY4, 0, "LISTEN", 1000, (WEB,), 0x1000)
ANSWER = Ownership((WEB,), 1000, "LISTEN", Via.LISTENER, 0x1000)


class SlowSource:
    """A source whose refresh can be held (a walk under a flood) and whose lhash2 answers."""

    def __init__(self) -> None:
        self.complete = True
        self.hold = threading.Event()
        self.held = threading.Event()
        self.release = threading.Event()
        self.answer: Ownership | None = ANSWER
        self.busy = False

    def refresh(self, watch: Any = None) -> GuestView:
        if self.hold.is_set():
            self.held.set()
            self.release.wait(10)
        return GuestView((LISTENER,), (WEB,), (), self.complete, () if self.complete else ("torn",))

    def lookup_listener(self, flow: Flow) -> Ownership | None:
        if self.busy:
            raise TimeoutError("owner source busy")
        return self.answer

    def lookup(self, flow: Flow) -> Ownership | None:
        return None

    def generation(self) -> int:
        return 0


def _refresher() -> tuple[Refresher, SlowSource, list[set[BlockEntry]], list[set[BlockEntry]]]:
    source = SlowSource()
    engine = Engine(1, {}, cast(Any, source), compile_policy(uids=[1001]), OwnerCache())
    kept: list[set[BlockEntry]] = []
    gone: list[set[BlockEntry]] = []

    def renew(keep: set[BlockEntry], lost: set[BlockEntry]) -> None:
        kept.append(set(keep))
        gone.append(set(lost))

    sets = ListenerSets(renew, lambda: None)
    r = Refresher(1, cast(Any, source), engine, lambda e: None, 60.0, sets)
    return r, source, kept, gone


def test_renewals_go_on_while_a_walk_takes_longer_than_a_grant_lives() -> None:
    r, source, kept, _gone = _refresher()
    r.refresh_once(walk=True)
    r.keep_listeners()
    assert kept and {e.port for e in kept[-1]} == {8000}
    source.hold.set()
    walk = threading.Thread(target=r.refresh_once)
    walk.start()
    assert source.held.wait(5)
    assert r.keeper is not None
    before = r.grant_renewals
    r.keeper.start()
    try:
        deadline = time.monotonic() + 5
        while r.grant_renewals < before + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Renewed every KEEP_INTERVAL while the walk is still held (over a grant's 1 s).
        assert r.grant_renewals >= before + 8 and walk.is_alive()
    finally:
        source.release.set()
        r.stop()
        walk.join(5)
        r.keeper.join(5)


def test_an_incomplete_view_keeps_the_grants_for_a_bounded_time_only() -> None:
    r, source, kept, gone = _refresher()
    r.refresh_once(walk=True)
    r.keep_listeners()
    granted = kept[-1]
    source.complete = False
    r.refresh_once()
    r.keep_listeners()
    assert kept[-1] == granted and not gone[-1] and r.grants_carried == 1
    # Past CARRY_SECONDS after the last complete view: nothing carried, the entries deleted.
    r._grants_at -= CARRY_SECONDS + 1
    r.refresh_once()
    r.keep_listeners()
    assert kept[-1] == set() and gone[-1] == granted
    # A complete view grants again.
    source.complete = True
    r.refresh_once()
    r.keep_listeners()
    assert kept[-1] == granted


def test_a_renewal_that_does_not_answer_lets_the_grant_lapse_a_refusal_deletes_it() -> None:
    r, source, kept, gone = _refresher()
    r.refresh_once(walk=True)
    r.keep_listeners()
    granted = kept[-1]
    rounds = len(kept)
    source.busy = True  # the packet path holds the source under a flood
    r.keep_listeners()
    # Neither renewed nor deleted: the kernel entries live out their GRANT_TTL.
    assert len(kept) == rounds and r.granted == granted and r.grant_unanswered == len(granted)
    source.busy = False
    r.keep_listeners()
    assert kept[-1] == granted and not gone[-1]
    # Unanswered for a whole GRANT_TTL: lapsed in the kernel, no longer counted as granted.
    source.busy = True
    for _ in range(int(GRANT_TTL / KEEP_INTERVAL)):
        r.keep_listeners()
    assert r.granted == set() and gone[-1] == set()
    # A refusal (another sock answers) deletes at once.
    source.busy = False
    r.keep_listeners()
    assert kept[-1] == granted
    source.answer = Ownership((WEB,), 1000, "LISTEN", Via.LISTENER, 0x2000)
    r.keep_listeners()
    assert kept[-1] == set() and gone[-1] == granted and r.granted == set()


class ChangingSource(SlowSource):
    """A source whose views are whatever the test sets (same objects for unchanged sockets,
    as the incremental refreshes hand them back)."""

    def __init__(self) -> None:
        super().__init__()
        self.sockets: tuple[GuestSocket, ...] = (LISTENER,)

    def refresh(self, watch: Any = None) -> GuestView:
        return GuestView(self.sockets, (WEB,), (), True, ())


def test_grants_from_the_cached_syn_sockets_equal_grants_from_every_socket() -> None:
    """The refresher recomputes grants over the SYN-taking sockets its entry cache keeps (not
    every socket of a crowd); the result equals listener_grants over the whole view, through
    listeners appearing, a blocked rival joining and leaving, and a policy change."""
    from xfgate.verdict.listeners import listener_grants

    source = ChangingSource()
    engine = Engine(1, {}, cast(Any, source), compile_policy(uids=[1001]), OwnerCache())
    r = Refresher(1, cast(Any, source), engine, lambda e: None, 60.0, ListenerSets(_no, _none))
    evil = Owner(300, 1001, 1001, "evil", fd=4)
    conns = tuple(
        GuestSocket(
            IPProto.TCP,
            ANY4,
            40000 + i,
            IPv4Address(0x0A000001),
            80,
            "ESTABLISHED",
            1000,
            (WEB,),
            0x9000 + i,
        )
        for i in range(50)
    )
    web2 = GuestSocket(IPProto.TCP, ANY4, 9000, ANY4, 0, "LISTEN", 1000, (WEB,), 0x2000)
    rival = GuestSocket(IPProto.TCP, ANY4, 9000, ANY4, 0, "LISTEN", 1001, (evil,), 0x3000)
    views = [
        (LISTENER, *conns),
        (LISTENER, web2, *conns),
        (LISTENER, web2, rival, *conns[:10]),  # a blocked rival on :9000: no grant there
        (LISTENER, web2, *conns[:10]),
        (web2,),
    ]
    for sockets in views:
        source.sockets = sockets
        r.refresh_once(walk=True)
        policy = engine.policy
        want = listener_grants(sockets, policy, engine.facts)
        assert r._grants == want, sockets
        assert len(r._syn_sockets(engine.facts)) <= 3  # not the connections
    assert {g.entry.port for g in r._grants} == {9000}
    engine.set_policy(compile_policy(uids=[1001], ports=["tcp/9000"]))
    r.refresh_once(walk=True)
    assert r._grants == set()


def _no(keep: set[BlockEntry], gone: set[BlockEntry]) -> None:
    pass


def _none() -> None:
    pass
