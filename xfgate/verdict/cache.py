"""Flow -> ownership cache with TTLs, negative entries and single-flight loading.

Ownership (not the verdict) is cached, so a policy change never needs a guest walk to take
effect; the cache is still dropped on a policy change (a pid may have been reused meanwhile)
and whenever the owner source's generation changes (guest reboot: every answer is stale).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from xfgate.flow import Flow, Ownership

Timer = Callable[[], float]


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    loads: int
    size: int
    clears: int


class OwnerCache:
    """Thread-safe. ``get_or_load`` runs the loader at most once per key at a time: concurrent
    misses for one flow wait for the first caller's answer instead of walking the guest again."""

    def __init__(
        self,
        ttl: float = 10.0,
        negative_ttl: float = 1.0,
        maxsize: int = 65536,
        timer: Timer = time.monotonic,
    ) -> None:
        if negative_ttl > ttl:
            raise ValueError("negative_ttl must not exceed ttl")
        self._timer = timer
        self._negative_ttl = negative_ttl
        # One TTLCache with the long TTL; negative entries carry their own, shorter, expiry.
        self._entries: TTLCache[Flow, tuple[Ownership | None, float]] = TTLCache(
            maxsize=maxsize, ttl=ttl, timer=timer
        )
        self._lock = threading.Lock()
        self._inflight: dict[Flow, threading.Event] = {}
        self._generation: int | None = None
        self._hits = self._misses = self._loads = self._clears = 0

    def check_generation(self, generation: int) -> bool:
        """Drop everything if the source's generation moved. True if it did."""
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

    def get(self, flow: Flow) -> tuple[bool, Ownership | None]:
        """(found, ownership); found False on a miss or an expired negative entry."""
        with self._lock:
            return self._get_locked(flow)

    def _get_locked(self, flow: Flow) -> tuple[bool, Ownership | None]:
        entry = self._entries.get(flow)
        if entry is None:
            return False, None
        value, expires = entry
        if value is None and self._timer() >= expires:
            del self._entries[flow]
            return False, None
        return True, value

    def put(self, flow: Flow, value: Ownership | None) -> None:
        with self._lock:
            self._put_locked(flow, value)

    def _put_locked(self, flow: Flow, value: Ownership | None) -> None:
        expires = self._timer() + self._negative_ttl if value is None else 0.0
        self._entries[flow] = (value, expires)

    def get_or_load(
        self, flow: Flow, loader: Callable[[Flow], Ownership | None], wait: float = 5.0
    ) -> tuple[Ownership | None, bool]:
        """(ownership, from_cache). A loader exception propagates to its caller only; waiters
        of that load then try loading themselves."""
        for _ in range(3):  # bounded: a waiter whose leader failed retries at most twice
            with self._lock:
                found, value = self._get_locked(flow)
                if found:
                    self._hits += 1
                    return value, True
                event = self._inflight.get(flow)
                if event is None:
                    event = threading.Event()
                    self._inflight[flow] = event
                    leader = True
                    self._misses += 1
                else:
                    leader = False
            if leader:
                try:
                    self._loads += 1
                    value = loader(flow)
                    self.put(flow, value)
                    return value, False
                finally:
                    with self._lock:
                        del self._inflight[flow]
                    event.set()
            event.wait(wait)
        self._loads += 1
        value = loader(flow)
        self.put(flow, value)
        return value, False

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._loads, len(self._entries), self._clears
            )
