"""Flow -> ownership cache with TTLs, negative entries and single-flight loading.

Ownership (not the verdict) is cached, so a policy change never needs a guest walk to take
effect; the cache is still dropped on a policy change (a pid may have been reused meanwhile)
and whenever the owner source's generation changes (guest reboot: every answer is stale).

Keys are a flow's 5-tuple, or a ``ListenerKey`` (proto, guest address, guest port) for the
answers that belong to a listening socket rather than to one connection (see the engine's
inbound-SYN path). An answer without any owner (no socket, or a TIME_WAIT/orphaned one) lives
only ``negative_ttl``: the tuple is reused by the next connection, the listener appears soon.
A listener's answer lives ``listener_ttl`` (default 1 s, shorter than the refresher's 2 s walk
that fills the kernel's blocked-port sets): a port taken over by another process's listener is
seen within that, while a service under load still costs one lookup per second, not per SYN.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from xfgate.flow import Flow, IPAddress, Ownership

Timer = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ListenerKey:
    """Where the guest kernel looks for the listener of a new connection: the destination
    (proto, guest address, guest port) of an incoming SYN, whatever its source."""

    proto: int
    local: IPAddress
    lport: int

    @classmethod
    def of(cls, flow: Flow) -> ListenerKey:
        return cls(flow.proto, flow.local, flow.lport)


class AnswerSource(enum.StrEnum):
    """Where a verdict's owner answer came from (the verdict log's and status's ``source``)."""

    CACHE = "cache"  # an entry of this cache
    INTROSPECTION = "introspection"  # the owner source (guest memory), just now
    PARSE = "parse"  # decided from the packet alone, without an owner
    ERROR = "error"  # an internal error: the --on-error verdict
    TIMEOUT = "timeout"  # the owner source did not answer within the packet path's bound


@dataclass(frozen=True, slots=True)
class Answer:
    """An owner answer and where it came from. ``ownership`` None: the guest has no socket."""

    ownership: Ownership | None
    source: AnswerSource


CacheKey = Flow | ListenerKey
Loader = Callable[[Flow], Ownership | None]


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    loads: int
    size: int
    clears: int


class _ExpiringEntries:
    """key -> (value, expiry time), at most `maxsize` (cachetools' LRUCache: the least
    recently used goes first when full); an expired entry is never returned, and is dropped
    when met. Not locked (OwnerCache holds its lock). Each entry carries its own expiry, so
    the LRUCache needs no timer: cachetools.TTLCache's get and set cost 3.7 us per new flow
    (a timer context and a linked list per call) on the packet path."""

    def __init__(self, maxsize: int, timer: Timer) -> None:
        self._timer = timer
        self._items: LRUCache[CacheKey, tuple[Ownership | None, float]] = LRUCache(
            maxsize=max(1, maxsize)
        )

    def get(self, key: CacheKey) -> tuple[Ownership | None, float] | None:
        entry = self._items.get(key)
        if entry is not None and self._timer() >= entry[1]:
            del self._items[key]
            return None
        return entry

    def put(self, key: CacheKey, value: Ownership | None, expires: float) -> None:
        self._items[key] = (value, expires)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class OwnerCache:
    """Thread-safe. ``get_or_load`` runs the loader at most once per key at a time: concurrent
    misses for one flow wait for the first caller's answer instead of walking the guest again."""

    def __init__(
        self,
        ttl: float = 10.0,
        negative_ttl: float = 1.0,
        maxsize: int = 65536,
        timer: Timer = time.monotonic,
        listener_ttl: float = 1.0,
    ) -> None:
        if negative_ttl > ttl:
            raise ValueError("negative_ttl must not exceed ttl")
        self._timer = timer
        self._negative_ttl = negative_ttl
        self._ttl = ttl
        self._listener_ttl = listener_ttl  # ttl bounds it too
        # Every entry carries its own expiry: ttl, or the shorter one that applies to it.
        self._entries = _ExpiringEntries(maxsize, timer)
        self._lock = threading.Lock()
        # Loads under way: None, or the Event a waiter made for the leader to set.
        self._inflight: dict[CacheKey, threading.Event | None] = {}
        self._generation: int | None = None
        self._hits = self._misses = self._loads = self._clears = 0

    def check_generation(self, generation: int) -> bool:
        """Drop everything if the source's generation moved. True if it did."""
        if self._generation == generation:
            return False  # every packet's case, without the lock (one attribute read)
        with self._lock:
            if self._generation == generation:
                return False
            first = self._generation is None
            self._generation = generation
            self._entries.clear()
            if not first:
                self._clears += 1
            return not first

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._clears += 1

    def get(self, key: CacheKey) -> Answer | None:
        """The cached answer (source CACHE); None on a miss or an expired short-lived entry."""
        with self._lock:
            return self._get_locked(key)

    def _get_locked(self, key: CacheKey) -> Answer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        return Answer(entry[0], AnswerSource.CACHE)

    def put(self, key: CacheKey, value: Ownership | None) -> None:
        with self._lock:
            self._put_locked(key, value)

    def _put_locked(self, key: CacheKey, value: Ownership | None) -> None:
        # The long ttl, or the earlier of the short ones that apply.
        ttl = self._ttl
        if value is None or not value.owners:
            ttl = min(ttl, self._negative_ttl)
        if isinstance(key, ListenerKey):
            ttl = min(ttl, self._listener_ttl)
        self._entries.put(key, value, self._timer() + ttl)

    def get_or_load(
        self,
        flow: Flow,
        loader: Loader,
        wait: float = 5.0,
        *,
        key: CacheKey | None = None,
        store_as: Callable[[Ownership | None], CacheKey] | None = None,
    ) -> Answer:
        """The answer looked up under `key` (default the flow), source CACHE, or, on a miss,
        loaded with `loader(flow)` (source INTROSPECTION) and stored under `store_as(answer)`
        (default `key`). A loader
        exception propagates to its caller only; waiters of that load then try themselves."""
        want: CacheKey = flow if key is None else key
        for _ in range(3):  # bounded: a waiter whose leader failed retries at most twice
            with self._lock:
                cached = self._get_locked(want)
                if cached is not None:
                    self._hits += 1
                    return cached
                lead = want not in self._inflight
                if lead:
                    # The leader marks the key; an Event is made only if a waiter comes (most
                    # misses have none: one allocation and one set() fewer per new flow).
                    self._inflight[want] = None
                    self._misses += 1
                else:
                    event = self._inflight[want] or threading.Event()
                    self._inflight[want] = event
            if lead:
                return self._lead(flow, loader, want, store_as)
            event.wait(wait)
        return self._load(flow, loader, want, store_as)

    def _lead(
        self,
        flow: Flow,
        loader: Loader,
        want: CacheKey,
        store_as: Callable[[Ownership | None], CacheKey] | None,
    ) -> Answer:
        """The leader's load: the answer stored and the key released under one lock."""
        self._loads += 1
        try:
            value = loader(flow)
            store_key = want if store_as is None else store_as(value)
        except BaseException:
            with self._lock:
                event = self._inflight.pop(want)
            if event is not None:
                event.set()  # waiters try themselves
            raise
        with self._lock:
            event = self._inflight.pop(want)
            try:
                self._put_locked(store_key, value)
            finally:
                if event is not None:
                    event.set()
        return Answer(value, AnswerSource.INTROSPECTION)

    def _load(
        self,
        flow: Flow,
        loader: Loader,
        want: CacheKey,
        store_as: Callable[[Ownership | None], CacheKey] | None,
    ) -> Answer:
        self._loads += 1
        value = loader(flow)
        self.put(want if store_as is None else store_as(value), value)
        return Answer(value, AnswerSource.INTROSPECTION)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._loads, len(self._entries), self._clears
            )
