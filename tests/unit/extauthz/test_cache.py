"""DecisionCache: LRU bound, per-entry expiry, stats, and one computation per key under
concurrency."""

from __future__ import annotations

import threading
import time

import pytest

from meshward.extauthz.cache import ENTRY_OVERHEAD, DecisionCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hit_after_miss_and_stats() -> None:
    clock = Clock()
    cache: DecisionCache[str] = DecisionCache(10 * ENTRY_OVERHEAD, ttl=60, timer=clock)
    calls = []

    def compute() -> tuple[str, float]:
        calls.append(1)
        return "v", clock.now + 30

    assert cache.get_or_compute("k", compute) == ("v", False)
    assert cache.get_or_compute("k", compute) == ("v", True)
    assert len(calls) == 1
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    assert cache.stats.hit_ratio == 0.5


def test_entry_expires_at_its_own_time_and_never_past_the_ttl() -> None:
    clock = Clock()
    cache: DecisionCache[str] = DecisionCache(10 * ENTRY_OVERHEAD, ttl=60, timer=clock)
    cache.get_or_compute("short", lambda: ("a", clock.now + 5))  # e.g. the token's exp
    cache.get_or_compute("long", lambda: ("b", clock.now + 3600))  # capped by the TTL
    clock.now += 4.9
    assert cache.get("short") == "a"
    clock.now += 0.2
    assert cache.get("short") is None
    assert cache.stats.expirations == 1
    clock.now += 54.8
    assert cache.get("long") == "b"
    clock.now += 0.2
    assert cache.get("long") is None


def test_an_already_expired_result_is_returned_but_not_stored() -> None:
    clock = Clock()
    cache: DecisionCache[str] = DecisionCache(10 * ENTRY_OVERHEAD, ttl=60, timer=clock)
    assert cache.get_or_compute("k", lambda: ("v", clock.now - 1)) == ("v", False)
    assert len(cache) == 0
    assert cache.get_or_compute("k", lambda: ("w", clock.now + 1)) == ("w", False)


def test_lru_bound_evicts_the_least_recently_used() -> None:
    clock = Clock()
    cache: DecisionCache[int] = DecisionCache(3 * ENTRY_OVERHEAD, ttl=60, timer=clock)
    for i in range(3):
        cache.get_or_compute(i, lambda i=i: (i, clock.now + 60))
    assert cache.get(0) == 0  # 0 is now the most recent; 1 the least
    cache.get_or_compute(3, lambda: (3, clock.now + 60))
    assert len(cache) == 3
    assert cache.stats.evictions == 1
    assert cache.get(1) is None
    assert cache.get(0) == 0 and cache.get(3) == 3


def test_version_in_the_key_makes_old_entries_unreachable() -> None:
    clock = Clock()
    cache: DecisionCache[str] = DecisionCache(10 * ENTRY_OVERHEAD, ttl=60, timer=clock)
    cache.get_or_compute(("v1", "foo/a", "/x"), lambda: ("old", clock.now + 60))
    value, hit = cache.get_or_compute(("v2", "foo/a", "/x"), lambda: ("new", clock.now + 60))
    assert (value, hit) == ("new", False)


def test_concurrent_misses_for_one_key_compute_once() -> None:
    cache: DecisionCache[int] = DecisionCache(10 * ENTRY_OVERHEAD, ttl=60)
    started = threading.Event()
    release = threading.Event()
    calls = []

    def compute() -> tuple[int, float]:
        calls.append(1)
        started.set()
        release.wait(5)
        return 42, time.monotonic() + 60

    results: list[tuple[int, bool]] = []
    leader = threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute)))
    leader.start()
    assert started.wait(5)
    followers = [
        threading.Thread(target=lambda: results.append(cache.get_or_compute("k", compute)))
        for _ in range(8)
    ]
    for t in followers:
        t.start()
    deadline = time.monotonic() + 5
    while cache.stats.coalesced < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in [leader, *followers]:
        t.join(5)
    assert len(calls) == 1
    assert [v for v, _ in results] == [42] * 9
    assert cache.stats.coalesced == 8


def test_a_failed_computation_reaches_its_waiters_and_is_not_cached() -> None:
    cache: DecisionCache[int] = DecisionCache(10 * ENTRY_OVERHEAD, ttl=60)
    entered = threading.Event()
    release = threading.Event()

    def boom() -> tuple[int, float]:
        entered.set()
        release.wait(5)
        raise RuntimeError("evaluator broke")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get_or_compute("k", boom)
        except RuntimeError as exc:
            errors.append(exc)

    first = threading.Thread(target=call)
    first.start()
    assert entered.wait(5)
    second = threading.Thread(target=call)
    second.start()
    deadline = time.monotonic() + 5
    while cache.stats.coalesced < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    first.join(5)
    second.join(5)
    assert len(errors) == 2
    assert cache.get_or_compute("k", lambda: (7, time.monotonic() + 60)) == (7, False)


def test_sizes_must_be_sane() -> None:
    with pytest.raises(ValueError):
        DecisionCache(0)


# ---- bounded in bytes (issue 13) ---------------------------------------------------------------


def test_keys_are_stored_hashed_never_raw() -> None:
    cache: DecisionCache[str] = DecisionCache(1 << 20, ttl=60)
    path = "/" + "a" * 15_000
    cache.get_or_compute(("v1", "foo/a", path), lambda: ("x", time.monotonic() + 60))
    stored = list(cache._store.keys())
    assert [len(k) for k in stored] == [32] and all(isinstance(k, bytes) for k in stored)
    assert cache.get(("v1", "foo/a", path)) == "x"
    assert cache.get(("v1", "foo/a", path + "b")) is None
    # Equal-looking keys of different types stay apart (repr keeps types).
    cache.get_or_compute(("v1", 1), lambda: ("int", time.monotonic() + 60))
    cache.get_or_compute(("v1", "1"), lambda: ("str", time.monotonic() + 60))
    assert (cache.get(("v1", 1)), cache.get(("v1", "1"))) == ("int", "str")


def test_entries_are_charged_their_size_and_the_total_never_passes_the_budget() -> None:
    budget = 10 * ENTRY_OVERHEAD + 5000
    cache: DecisionCache[str] = DecisionCache(budget, ttl=60, sizeof=len)
    for i in range(200):
        cache.get_or_compute(i, lambda i=i: ("v" * (i % 7 * 300), time.monotonic() + 60))
        assert cache.size_bytes <= budget
    assert cache.stats.evictions > 0
    assert cache.size_bytes == sum(ENTRY_OVERHEAD + len(e.value) for e in cache._store.values())
    # A value larger than the whole budget is answered but never stored.
    value, hit = cache.get_or_compute("huge", lambda: ("x" * budget, time.monotonic() + 60))
    assert (len(value), hit) == (budget, False) and cache.stats.too_large == 1
    assert cache.get("huge") is None


def test_recharge_reweighs_a_grown_entry_and_evicts_to_fit() -> None:
    class Box:
        def __init__(self) -> None:
            self.size = 0

    budget = 4 * ENTRY_OVERHEAD + 1000
    cache: DecisionCache[Box] = DecisionCache(budget, ttl=60, sizeof=lambda b: b.size)
    boxes = {
        i: cache.get_or_compute(i, lambda: (Box(), time.monotonic() + 60))[0] for i in range(4)
    }
    assert len(cache) == 4
    boxes[3].size = 1000 + ENTRY_OVERHEAD  # grew after it was stored
    cache.recharge(3)
    assert cache.size_bytes <= budget and cache.get(3) is boxes[3] and len(cache) == 3
