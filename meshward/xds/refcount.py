"""How many workloads hold each resource version, counted per shared tuple where possible.

The compile worker (meshward.xds.compile_process) tells the parent which resource versions are
new (their bodies must be sent) and which no workload holds any more (the parent drops them).
It used to count a reference per (workload, resource): in the worst case (N services that may
all call each other) every workload holds ~N resources, so a mesh-wide edit moved ~N^2
references one by one in Python (about 1.3 s of a 2 s worker compile at 1,000 services).

A workload's config names its resources as runs of key tuples (meshward.xds.compiling
``WorkloadConfig.fingerprint``), and the runs of a mesh-wide tuple are all of it but the
workload's own few entries. So a holder of such a tuple is counted once, with the positions
it leaves out (its gaps): the version at position ``i`` is held by the tuple while
``holders - gaps_at[i] > 0``. Adding or removing a holder changes that only at its gaps and at
the positions every other holder leaves out (kept in buckets by count, almost always empty):
O(gaps) per holder, O(tuple) only when the first holder comes or the last one goes. Runs that
do not fit (small tuples, many gaps, overlapping slices) are counted per resource, as before.

:class:`RefCounts` keeps, per resource version, how many sources hold it (a workload's own
reference, or a position of a shared tuple that some holder covers): ``live`` is exactly the
set of versions some workload holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from meshward.xds.compiling import Key, WorkloadConfig
from meshward.xds.resources import Resource

#: A key tuple is counted per holder (not per resource) when it has more than this many keys
#: and a holder leaves out at most MAX_GAPS of them.
MIN_SHARED = 32
MAX_GAPS = 16


@dataclass(eq=False)
class _Shared:
    keys: tuple[Key, ...]  # held, so its id is not reused while counted
    resources: tuple[Resource, ...]
    holders: int = 0
    gaps: dict[int, int] = field(default_factory=dict)  # position -> holders leaving it out
    by_count: dict[int, set[int]] = field(default_factory=dict)  # gap count -> positions


class RefCounts:
    """Reference counts of resource versions over a set of workload configs."""

    def __init__(self) -> None:
        self.live: dict[Key, int] = {}  # version -> sources holding it (> 0 after recount)
        self._shared: dict[int, _Shared] = {}

    def recount(
        self, pairs: Iterable[tuple[WorkloadConfig | None, WorkloadConfig | None]]
    ) -> tuple[dict[Key, Resource], tuple[Key, ...]]:
        """Move the references of each (old config, new config) pair from old to new: the
        versions no config held before (with their Resource) and those none holds now."""
        pairs = list(pairs)
        touched: dict[Key, None] = {}
        for old, _ in pairs:
            if old is not None:
                self._config(old, -1, touched, None)
        fresh: dict[Key, Resource] = {}
        for _, new in pairs:
            if new is not None:
                self._config(new, +1, touched, fresh)
        live = self.live
        dropped = tuple(key for key in touched if live.get(key) == 0)
        for key in dropped:
            del live[key]
        return fresh, dropped

    def _config(
        self,
        config: WorkloadConfig,
        step: int,
        touched: dict[Key, None],
        fresh: dict[Key, Resource] | None,
    ) -> None:
        groups: dict[int, tuple[tuple[Key, ...], tuple[Resource, ...], list[tuple[int, int]]]]
        groups = {}
        if len(config.rows) != len(config.fingerprint):  # not packed by compiling._Packer
            for items in config.resources.values():
                for r in items:
                    self._one(r.key, r, step, touched, fresh)
            return
        for (keys, start, stop), rows in zip(config.fingerprint, config.rows, strict=True):
            if stop > start:
                groups.setdefault(id(keys), (keys, rows, []))[2].append((start, stop))
        for keys, rows, slices in groups.values():
            gaps = _gaps(len(keys), slices) if len(keys) > MIN_SHARED else None
            if gaps is None:  # per resource (inlined _one: most workloads' runs are small)
                live = self.live
                for start, stop in slices:
                    if step > 0:
                        for key, resource in zip(keys[start:stop], rows[start:stop], strict=True):
                            if key not in live:
                                live[key] = 0
                                if fresh is not None:
                                    fresh[key] = resource
                            live[key] += 1
                    else:
                        for key in keys[start:stop]:
                            live[key] -= 1
                            if live[key] == 0:
                                touched[key] = None
            elif step > 0:
                self._add(keys, rows, gaps, touched, fresh)
            else:
                self._remove(keys, gaps, touched)

    def _one(
        self,
        key: Key,
        resource: Resource,
        step: int,
        touched: dict[Key, None],
        fresh: dict[Key, Resource] | None,
    ) -> None:
        live = self.live
        if step > 0:
            if key not in live:
                live[key] = 0
                if fresh is not None:
                    fresh[key] = resource
            live[key] += 1
        else:
            live[key] -= 1
            if live[key] == 0:
                touched[key] = None

    def _add(
        self,
        keys: tuple[Key, ...],
        rows: tuple[Resource, ...],
        gaps: list[int],
        touched: dict[Key, None],
        fresh: dict[Key, Resource] | None,
    ) -> None:
        entry = self._shared.get(id(keys))
        if entry is None or entry.keys is not keys:
            entry = self._shared[id(keys)] = _Shared(keys, rows)
        left_out = set(gaps)
        if entry.holders == 0:  # every position it covers comes alive
            rising: Iterable[int] = (i for i in range(len(keys)) if i not in left_out)
        else:  # the positions every holder so far leaves out, which this one covers
            rising = entry.by_count.get(entry.holders, set()) - left_out
        for i in rising:
            self._one(keys[i], rows[i], +1, touched, fresh)
        for i in gaps:
            _move(entry, i, +1)
        entry.holders += 1

    def _remove(self, keys: tuple[Key, ...], gaps: list[int], touched: dict[Key, None]) -> None:
        entry = self._shared[id(keys)]
        for i in gaps:
            _move(entry, i, -1)
        entry.holders -= 1
        left_out = set(gaps)
        if entry.holders == 0:  # it covered every position not left out; nobody else does
            falling: Iterable[int] = (i for i in range(len(keys)) if i not in left_out)
            del self._shared[id(keys)]
        else:  # positions only it covered
            falling = entry.by_count.get(entry.holders, set()) - left_out
        for i in falling:
            self._one(keys[i], entry.resources[i], -1, touched, None)

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.live)


def _gaps(size: int, slices: list[tuple[int, int]]) -> list[int] | None:
    """The positions of ``range(size)`` that ``slices`` leave out, or None when they overlap or
    leave out more than MAX_GAPS."""
    gaps: list[int] = []
    at = 0
    for start, stop in sorted(slices):
        if start < at:
            return None
        if start - at + len(gaps) > MAX_GAPS:
            return None
        gaps.extend(range(at, start))
        at = stop
    if size - at + len(gaps) > MAX_GAPS:
        return None
    gaps.extend(range(at, size))
    return gaps


def _move(entry: _Shared, position: int, step: int) -> None:
    before = entry.gaps.get(position, 0)
    after = before + step
    if before:
        bucket = entry.by_count[before]
        bucket.discard(position)
        if not bucket:
            del entry.by_count[before]
    if after:
        entry.gaps[position] = after
        entry.by_count.setdefault(after, set()).add(position)
    else:
        del entry.gaps[position]


__all__ = ["MAX_GAPS", "MIN_SHARED", "RefCounts"]
