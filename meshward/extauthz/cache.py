"""The decision cache: bounded (LRU), every entry with its own expiry, concurrent misses for one
key computed once.

Entries carry an absolute expiry (monotonic clock) chosen by the caller: the global TTL, cut
short by the token's ``exp`` and by the next emergency-policy expiry. Keys start with the policy
version, so a new version makes every old entry unreachable at once without a flush (and without
a stampede: old entries simply age out of the LRU).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachetools import LRUCache

V = TypeVar("V")

DEFAULT_MAXSIZE = 100_000
DEFAULT_TTL = 60.0
_FLIGHT_TIMEOUT = 10.0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # misses that waited for another thread's computation
    evictions: int = 0  # dropped to make room (LRU)
    expirations: int = 0  # dropped because their time was up (found expired)

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class _Entry(Generic[V]):
    value: V
    expires_at: float


@dataclass
class _Flight(Generic[V]):
    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None
    error: BaseException | None = None


class _Store(LRUCache[Hashable, _Entry[V]]):
    """LRU storage; expiry is checked on read (cheaper per hit than a time-ordered heap), so an
    expired entry is dropped when next looked up or when the LRU pushes it out."""

    def __init__(self, maxsize: int, stats: CacheStats) -> None:
        super().__init__(maxsize=maxsize)
        self._stats = stats

    def popitem(self) -> tuple[Hashable, _Entry[V]]:
        item = super().popitem()
        self._stats.evictions += 1
        return item


class DecisionCache(Generic[V]):
    """Thread-safe. ``get_or_compute(key, compute)`` where ``compute() -> (value, expires_at)``
    and ``expires_at`` is on this cache's clock (default ``time.monotonic``); an entry whose
    expiry is not in the future is returned but not stored."""

    def __init__(
        self,
        maxsize: int = DEFAULT_MAXSIZE,
        ttl: float = DEFAULT_TTL,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize < 1:
            raise ValueError("decision cache size must be at least 1")
        if ttl < 0:
            raise ValueError("decision cache TTL must not be negative")
        self.maxsize = maxsize
        self.ttl = ttl
        self.timer = timer
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._store: _Store[V] = _Store(maxsize, self.stats)
        self._inflight: dict[Hashable, _Flight[V]] = {}

    def __len__(self) -> int:
        """Entries held, including expired ones not yet dropped."""
        with self._lock:
            return len(self._store)

    def _live(self, key: Hashable) -> _Entry[V] | None:
        """The unexpired entry for ``key`` (caller holds the lock)."""
        entry = self._store.get(key)
        if entry is not None and entry.expires_at <= self.timer():
            del self._store[key]
            self.stats.expirations += 1
            return None
        return entry

    def get(self, key: Hashable) -> V | None:
        """A cached value (counted as a hit) or None (not counted)."""
        with self._lock:
            entry = self._live(key)
            if entry is None:
                return None
            self.stats.hits += 1
            return entry.value

    def get_or_compute(
        self, key: Hashable, compute: Callable[[], tuple[V, float]]
    ) -> tuple[V, bool]:
        """(value, hit). Misses for the same key that overlap run ``compute`` once; the others
        wait for its result (and share its exception if it fails)."""
        with self._lock:
            entry = self._live(key)
            if entry is not None:
                self.stats.hits += 1
                return entry.value, True
            self.stats.misses += 1
            flight = self._inflight.get(key)
            leader = flight is None
            if flight is None:
                flight = self._inflight[key] = _Flight()
            else:
                self.stats.coalesced += 1
        if not leader:
            if not flight.done.wait(_FLIGHT_TIMEOUT):
                raise TimeoutError("a concurrent computation of this decision did not finish")
            if flight.error is not None:
                raise flight.error
            assert flight.value is not None
            return flight.value, False
        try:
            value, expires_at = compute()
        except BaseException as exc:
            flight.error = exc
            with self._lock:
                del self._inflight[key]
            flight.done.set()
            raise
        flight.value = value
        with self._lock:
            now = self.timer()
            expires_at = min(expires_at, now + self.ttl)
            if expires_at > now:  # a TTL of 0 turns caching off
                self._store[key] = _Entry(value, expires_at)
            del self._inflight[key]
        flight.done.set()
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
