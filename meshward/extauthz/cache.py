"""The decision cache: bounded in bytes (LRU), every entry with its own expiry, concurrent
misses for one key computed once.

Why bytes, not entries: a key holds what the rules read, and that can be a 16 KiB normalized
path; a cache of N entries could hold N x 16 KiB, gigabytes for a default N (issue 13). So keys
are hashed (SHA-256 of their repr: the raw path is never stored) and every entry is charged its
accounted size, a conservative estimate of what it costs in memory; the LRU drops the oldest
entries once the sum passes ``max_bytes``. A value that grows after it was stored (the
authorizer's per-identity allow responses) is re-charged with :meth:`DecisionCache.recharge`.

Entries carry an absolute expiry (monotonic clock) chosen by the caller: the global TTL, cut
short by the token's ``exp`` and by the next emergency-policy expiry. Keys start with the policy
version, so a new version makes every old entry unreachable at once without a flush (and without
a stampede: old entries simply age out of the LRU).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cachetools import LRUCache

V = TypeVar("V")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_TTL = 60.0
# What one entry costs besides its value: the 32-byte digest key (a bytes object), its slots in
# the LRU's three dicts (data, sizes, order), the entry object. Measured ~450 bytes on CPython
# 3.12 (tests/unit/extauthz/test_cache.py checks the whole estimate against tracemalloc).
ENTRY_OVERHEAD = 512
_FLIGHT_TIMEOUT = 10.0


def digest(key: Hashable) -> bytes:
    """The stored form of a key: SHA-256 of its repr. Keys are tuples of str, int, float, bool,
    None and nested tuples of those (meshward.extauthz.cache_key), whose repr is exact, so two keys
    share a digest only if they are equal (or SHA-256 collides)."""
    return hashlib.sha256(repr(key).encode("utf-8", "backslashreplace")).digest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # misses that waited for another thread's computation
    evictions: int = 0  # dropped to make room (LRU)
    expirations: int = 0  # dropped because their time was up (found expired)
    too_large: int = 0  # values larger than the whole budget: returned, never stored

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float


@dataclass
class _Flight(Generic[V]):
    done: threading.Event = field(default_factory=threading.Event)
    value: V | None = None
    error: BaseException | None = None


class _Store(LRUCache[bytes, _Entry[V]]):
    """LRU storage weighed in bytes; expiry is checked on read (cheaper per hit than a
    time-ordered heap), so an expired entry is dropped when next looked up or when the LRU
    pushes it out."""

    def __init__(
        self, max_bytes: int, stats: CacheStats, sizeof: Callable[[V], int], overhead: int
    ) -> None:
        super().__init__(maxsize=max_bytes)
        self._stats = stats
        self._sizeof = sizeof
        self._overhead = overhead

    def getsizeof(self, value: _Entry[V]) -> int:  # type: ignore[override]
        return self._overhead + max(0, int(self._sizeof(value.value)))

    def popitem(self) -> tuple[bytes, _Entry[V]]:
        item = super().popitem()
        self._stats.evictions += 1
        return item


def _no_size(value: object) -> int:
    return 0


class DecisionCache(Generic[V]):
    """Thread-safe. ``get_or_compute(key, compute)`` where ``compute() -> (value, expires_at)``
    and ``expires_at`` is on this cache's clock (default ``time.monotonic``); an entry whose
    expiry is not in the future is returned but not stored. ``sizeof(value)`` is the value's
    accounted size in bytes (each entry is charged that plus ``entry_overhead``)."""

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        ttl: float = DEFAULT_TTL,
        *,
        timer: Callable[[], float] = time.monotonic,
        sizeof: Callable[[V], int] = _no_size,
        entry_overhead: int = ENTRY_OVERHEAD,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("decision cache budget must be at least 1 byte")
        if ttl < 0:
            raise ValueError("decision cache TTL must not be negative")
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.timer = timer
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._store: _Store[V] = _Store(max_bytes, self.stats, sizeof, entry_overhead)
        self._inflight: dict[bytes, _Flight[V]] = {}

    def __len__(self) -> int:
        """Entries held, including expired ones not yet dropped."""
        with self._lock:
            return len(self._store)

    @property
    def size_bytes(self) -> int:
        """Accounted bytes of the entries held (never above ``max_bytes``)."""
        with self._lock:
            return int(self._store.currsize)

    def _live(self, key: bytes) -> _Entry[V] | None:
        """The unexpired entry for ``key`` (caller holds the lock)."""
        entry = self._store.get(key)
        if entry is not None and entry.expires_at <= self.timer():
            del self._store[key]
            self.stats.expirations += 1
            return None
        return entry

    def _put(self, key: bytes, entry: _Entry[V]) -> None:
        """Store (or re-weigh) ``entry``, evicting the oldest to fit (caller holds the lock)."""
        self._store.pop(key, None)
        if self._store.getsizeof(entry) > self.max_bytes:
            self.stats.too_large += 1
            return
        self._store[key] = entry

    def get(self, key: Hashable) -> V | None:
        """A cached value (counted as a hit) or None (not counted)."""
        hashed = digest(key)
        with self._lock:
            entry = self._live(hashed)
            if entry is None:
                return None
            self.stats.hits += 1
            return entry.value

    def recharge(self, key: Hashable) -> None:
        """Re-weigh ``key``'s entry after its value changed size (evicting others to fit)."""
        hashed = digest(key)
        with self._lock:
            entry = self._store.get(hashed)
            if entry is not None:
                self._put(hashed, entry)

    def get_or_compute(
        self, key: Hashable, compute: Callable[[], tuple[V, float]]
    ) -> tuple[V, bool]:
        """(value, hit). Misses for the same key that overlap run ``compute`` once; the others
        wait for its result (and share its exception if it fails)."""
        hashed = digest(key)
        with self._lock:
            entry = self._live(hashed)
            if entry is not None:
                self.stats.hits += 1
                return entry.value, True
            self.stats.misses += 1
            flight = self._inflight.get(hashed)
            leader = flight is None
            if flight is None:
                flight = self._inflight[hashed] = _Flight()
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
                del self._inflight[hashed]
            flight.done.set()
            raise
        flight.value = value
        with self._lock:
            now = self.timer()
            expires_at = min(expires_at, now + self.ttl)
            if expires_at > now:  # a TTL of 0 turns caching off
                self._put(hashed, _Entry(value, expires_at))
            del self._inflight[hashed]
        flight.done.set()
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._store.clear()
