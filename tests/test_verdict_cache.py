"""Owner cache: TTLs on a fake clock, negative entries, generations, single flight."""

from __future__ import annotations

import threading
from ipaddress import ip_address

import pytest

from xfgate.flow import Flow, Owner, Ownership, Via
from xfgate.inet import IPProto
from xfgate.verdict.cache import Answer, AnswerSource, ListenerKey, OwnerCache

CACHED, LOADED = AnswerSource.CACHE, AnswerSource.INTROSPECTION
FLOW = Flow(IPProto.TCP, ip_address("198.18.1.1"), 80, ip_address("198.18.0.1"), 5000)
OWNED = Ownership((Owner(1, 0, 0, "httpd"),), 0, "LISTEN", Via.LISTENER)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_positive_entries_live_for_the_ttl() -> None:
    clock = Clock()
    cache = OwnerCache(ttl=10, negative_ttl=1, timer=clock)
    cache.put(FLOW, OWNED)
    clock.now += 9.9
    assert cache.get(FLOW) == Answer(OWNED, CACHED)
    clock.now += 0.2
    assert cache.get(FLOW) is None


def test_negative_entries_expire_sooner() -> None:
    clock = Clock()
    cache = OwnerCache(ttl=10, negative_ttl=1, timer=clock)
    cache.put(FLOW, None)
    assert cache.get(FLOW) == Answer(None, CACHED)
    clock.now += 1.01
    assert cache.get(FLOW) is None


def test_generation_change_drops_everything() -> None:
    cache = OwnerCache(timer=Clock())
    assert cache.check_generation(1) is False  # first sight: nothing to drop
    cache.put(FLOW, OWNED)
    assert cache.check_generation(1) is False and cache.get(FLOW) is not None
    assert cache.check_generation(2) is True
    assert cache.get(FLOW) is None


def test_get_or_load_loads_once_then_hits() -> None:
    calls: list[Flow] = []

    def loader(flow: Flow) -> Ownership:
        calls.append(flow)
        return OWNED

    cache = OwnerCache(timer=Clock())
    assert cache.get_or_load(FLOW, loader) == Answer(OWNED, LOADED)
    assert cache.get_or_load(FLOW, loader) == Answer(OWNED, CACHED)
    assert calls == [FLOW]
    s = cache.stats()
    assert (s.hits, s.misses, s.loads) == (1, 1, 1)


def test_concurrent_misses_for_one_flow_trigger_one_lookup() -> None:
    cache = OwnerCache()
    release = threading.Event()
    calls = []

    def slow_loader(flow: Flow) -> Ownership:
        calls.append(flow)
        release.wait(10)
        return OWNED

    results: list[Answer] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_load(FLOW, slow_loader)))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    while not cache._inflight:  # the leader is inside the loader
        threading.Event().wait(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 8 and all(r.ownership == OWNED for r in results)


def test_a_failing_load_does_not_wedge_the_key() -> None:
    cache = OwnerCache(timer=Clock())

    def broken(flow: Flow) -> Ownership:
        raise RuntimeError("torn pointer")

    with pytest.raises(RuntimeError, match="torn pointer"):
        cache.get_or_load(FLOW, broken)
    assert cache.get_or_load(FLOW, lambda f: OWNED) == Answer(OWNED, LOADED)


def test_listener_keys_and_flows_are_separate_entries() -> None:
    cache = OwnerCache(timer=Clock())
    listener = ListenerKey.of(FLOW)
    assert listener == ListenerKey(IPProto.TCP, ip_address("198.18.1.1"), 80)
    cache.put(listener, OWNED)
    assert cache.get(listener) == Answer(OWNED, CACHED)
    assert cache.get(FLOW) is None
    other_client = Flow(IPProto.TCP, FLOW.local, 80, ip_address("198.18.7.7"), 6000)
    assert ListenerKey.of(other_client) == listener


def test_get_or_load_can_store_under_the_key_the_answer_names() -> None:
    calls: list[Flow] = []

    def loader(flow: Flow) -> Ownership:
        calls.append(flow)
        return OWNED

    cache = OwnerCache(timer=Clock())
    listener = ListenerKey.of(FLOW)
    # Asked under the listener, stored under the flow: the next ask misses the listener key.
    assert cache.get_or_load(FLOW, loader, key=listener, store_as=lambda o: FLOW) == Answer(
        OWNED, LOADED
    )
    assert cache.get(FLOW) == Answer(OWNED, CACHED) and cache.get(listener) is None
    assert cache.get_or_load(FLOW, loader, key=listener) == Answer(OWNED, LOADED)
    assert cache.get_or_load(FLOW, loader, key=listener) == Answer(OWNED, CACHED)
    assert len(calls) == 2


def test_answers_without_owners_live_the_negative_ttl() -> None:
    clock = Clock()
    cache = OwnerCache(ttl=10, negative_ttl=1, timer=clock)
    cache.put(FLOW, Ownership((), -1, "TIME_WAIT", Via.TIME_WAIT))
    assert cache.get(FLOW) is not None
    clock.now += 1.01
    assert cache.get(FLOW) is None


def test_listener_entries_live_the_listener_ttl() -> None:
    clock = Clock()
    cache = OwnerCache(ttl=10, negative_ttl=1, listener_ttl=2, timer=clock)
    listener = ListenerKey.of(FLOW)
    cache.put(listener, OWNED)
    cache.put(FLOW, OWNED)
    clock.now += 1.5
    assert cache.get(listener) == Answer(OWNED, CACHED)
    clock.now += 1.0
    assert cache.get(listener) is None  # a new listener on the port is looked up
    assert cache.get(FLOW) == Answer(OWNED, CACHED)


def test_an_uncontended_miss_makes_no_event_and_leaves_nothing_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The miss path's cheap case: no waiter, no Event made; the key released after."""
    made: list[object] = []
    real = threading.Event

    def counting() -> threading.Event:
        event = real()
        made.append(event)
        return event

    cache = OwnerCache(timer=Clock())
    monkeypatch.setattr(threading, "Event", counting)
    assert cache.get_or_load(FLOW, lambda f: OWNED) == Answer(OWNED, LOADED)
    assert made == [] and cache._inflight == {}


def test_a_failing_store_key_does_not_wedge_the_key() -> None:
    cache = OwnerCache(timer=Clock())

    def bad_key(_o: Ownership | None) -> Flow:
        raise RuntimeError("no key")

    with pytest.raises(RuntimeError, match="no key"):
        cache.get_or_load(FLOW, lambda f: OWNED, store_as=bad_key)
    assert cache._inflight == {}
    assert cache.get_or_load(FLOW, lambda f: OWNED) == Answer(OWNED, LOADED)
