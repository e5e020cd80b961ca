"""The compile worker's reference counts (meshward.xds.refcount), counted per shared key tuple
with each holder's gaps, equal counting every (workload, resource) reference one by one: the
same live versions, the same new ones (whose bodies go to the parent) and the same dropped
ones, over random sequences of configs holding runs of shared tuples, with few gaps (counted
per holder), many gaps or overlapping slices (counted per resource) and their own keys."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from meshward.xds.compiling import Key, WorkloadConfig
from meshward.xds.refcount import MAX_GAPS, MIN_SHARED, RefCounts
from meshward.xds.resources import Resource


def resource(name: str, version: str = "1") -> Resource:
    return Resource(type_url="t", name=name, hash=version, body=None)


def shared_tuple(tag: str, size: int) -> tuple[tuple[Key, ...], tuple[Resource, ...]]:
    rows = tuple(resource(f"{tag}{i:03d}") for i in range(size))
    return tuple(r.key for r in rows), rows


def config(rng: random.Random, pool: list[Any], serial: int) -> WorkloadConfig:
    """Runs of one or two shared tuples (a few gaps, many, or overlapping slices) and its own."""
    runs: list[tuple[tuple[Key, ...], int, int]] = []
    rows: list[tuple[Resource, ...]] = []
    for keys, resources in rng.sample(pool, rng.randint(1, 2)):
        shape = rng.random()
        if shape < 0.7:  # everyone else: a few positions cut
            cut = sorted(rng.sample(range(len(keys)), rng.randint(0, 3)))
        elif shape < 0.85:  # more gaps than MAX_GAPS: counted per resource
            cut = sorted(rng.sample(range(len(keys)), min(len(keys) - 1, MAX_GAPS + 1)))
        else:
            cut = []
        start = 0
        for at in [*cut, len(keys)]:
            if at > start:
                runs.append((keys, start, at))
                rows.append(resources)
            start = at + 1
        if shape >= 0.85 and len(keys) > 4:  # overlapping: a slice counted twice
            runs.append((keys, 1, 3))
            rows.append(resources)
    own = tuple(
        resource(f"own{serial % 7}", str(rng.randint(0, 2))) for _ in range(rng.randint(0, 2))
    )
    if own:
        runs.append((tuple(r.key for r in own), 0, len(own)))
        rows.append(own)
    return WorkloadConfig(fingerprint=tuple(runs), rows=tuple(rows))


def naive(configs: dict[str, WorkloadConfig]) -> Counter[Key]:
    return Counter(k for c in configs.values() for k in c.flat_keys())


def test_counting_per_shared_tuple_equals_counting_every_reference() -> None:
    rng = random.Random(1414)
    pool = [shared_tuple(tag, MIN_SHARED + 1 + 9 * i) for i, tag in enumerate("abc")]
    pool.append(shared_tuple("small", 5))  # too small to count per holder
    pool.append(shared_tuple("b", MIN_SHARED + 10))  # the same keys as "b" in another tuple
    counts = RefCounts()
    configs: dict[str, WorkloadConfig] = {}
    serial = 0
    for step in range(300):
        pairs: list[tuple[WorkloadConfig | None, WorkloadConfig | None]] = []
        new = dict(configs)
        for ref in rng.sample([f"w{i}" for i in range(12)], rng.randint(1, 6)):
            serial += 1
            made = None if rng.random() < 0.2 else config(rng, pool, serial)
            old = new.pop(ref, None)
            if made is not None:
                new[ref] = made
            if old is not None or made is not None:
                pairs.append((old, made))
        before = set(naive(configs))
        fresh, dropped = counts.recount(pairs)
        configs = new
        after = set(naive(configs))
        assert set(counts) == after, step
        assert set(fresh) == after - before, step
        assert set(dropped) == before - after and len(dropped) == len(set(dropped)), step
        assert all(fresh[k].key == k for k in fresh)
        # Bounded: an entry per shared tuple some config holds, no more.
        held = {id(keys) for c in configs.values() for keys, _, _ in c.fingerprint}
        assert set(counts._shared) <= held, step
    for ref in list(configs):  # everyone leaves: nothing stays counted
        counts.recount([(configs.pop(ref), None)])
    assert len(counts) == 0 and counts._shared == {}
