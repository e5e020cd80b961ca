"""A workload's resources as runs of shared mesh-wide tuples, so passes over them can do their
per-message work once per shared tuple instead of once per workload holding it.

A namespace-wide ALLOW over N services gives every caller every other peer: its outbound
lists are the mesh-wide lists minus its own few entries (meshward.compile.outbound
``PeerTable.everyone_else``), and every workload then holds ~N messages per kind. The
control plane's passes over a workload's messages (the Envoy-limits backstop, the agent-secret
rewrite, packing, fingerprinting) used to walk all of them in Python: O(N^2) steps at N
workloads although only O(N) messages are distinct. With the runs below, a pass maps each
shared tuple once (memoized by identity) and builds each workload's result by C-level slicing
of the mapped tuple, doing per-message Python work only for the workload's own messages.

A :data:`Run` is ``(shared, start, stop, own)``: ``shared[start:stop]`` followed by the
messages ``own``. A sequence is described by a tuple of runs (:data:`Runs`); :func:`flat`
gives it back as a plain tuple.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Sequence
from typing import Any

#: ``shared[start:stop]``, then ``own``
Run = tuple[tuple[Any, ...], int, int, tuple[Any, ...]]
Runs = tuple[Run, ...]

EMPTY: tuple[Any, ...] = ()


def own(items: tuple[Any, ...]) -> Runs:
    """``items`` with nothing shared."""
    return ((EMPTY, 0, 0, items),) if items else ()


def flat(runs: Runs) -> tuple[Any, ...]:
    """The sequence ``runs`` describe."""
    if len(runs) == 1:
        shared, start, stop, mine = runs[0]
        if not mine:
            return shared if start == 0 and stop == len(shared) else shared[start:stop]
        if stop == start:
            return mine
    out: list[Any] = []
    for shared, start, stop, mine in runs:
        out.extend(shared[start:stop])
        out.extend(mine)
    return tuple(out)


def without(shared: tuple[Any, ...], cut: tuple[int, ...]) -> Runs:
    """``shared`` minus the positions ``cut`` (ascending)."""
    if not shared:
        return ()
    runs: list[Run] = []
    start = 0
    for at in cut:
        if at > start:
            runs.append((shared, start, at, EMPTY))
        start = at + 1
    if start < len(shared):
        runs.append((shared, start, len(shared), EMPTY))
    return tuple(runs)


def merged(
    few: tuple[Any, ...], many: tuple[Any, ...], runs: Runs, key: str = "name"
) -> tuple[tuple[Any, ...], Runs]:
    """``few`` merged into ``many`` (both sorted by ``key``; ``runs`` describe ``many``) as
    meshward.compile.workload's stable merge does (equal keys: ``few`` first): the merged
    tuple and runs describing it."""
    if not few:
        return many, runs
    get = operator.attrgetter(key)
    inserts: list[tuple[int, Any]] = []
    start = 0
    for message in few:
        at = bisect.bisect_left(many, get(message), lo=start, key=get)
        inserts.append((at, message))
        start = at
    out = _insert(runs, inserts)
    return flat(out), out


def _insert(runs: Runs, inserts: list[tuple[int, Any]]) -> Runs:
    """``runs`` with each ``(position, message)`` of ``inserts`` (positions ascending, in the
    sequence ``runs`` describe) put before the message at that position."""
    out: list[Run] = []
    pending = iter(inserts)
    nxt = next(pending, None)
    offset = 0  # position of the current run's first message
    for shared, start, stop, mine in runs:
        length = stop - start + len(mine)
        at, done = start, 0  # next shared position and own index not yet emitted
        while nxt is not None and nxt[0] - offset < length:
            q = nxt[0] - offset
            if q < stop - start:
                out.append((shared, at, start + q, (nxt[1],)))
                at = start + q
            else:
                k = q - (stop - start)
                out.append((shared, at, stop, (*mine[done:k], nxt[1])))
                at, done = stop, k
            nxt = next(pending, None)
        if at < stop or done < len(mine):
            out.append((shared, at, stop, mine[done:]))
        offset += length
    tail = [] if nxt is None else [nxt[1]]
    tail.extend(message for _, message in pending)
    if tail:
        out.append((EMPTY, 0, 0, tuple(tail)))
    return tuple(out)


def mapped(
    runs: Runs,
    shared_map: Callable[[tuple[Any, ...]], tuple[Any, ...]],
    own_map: Callable[[tuple[Any, ...]], Sequence[Any]],
) -> Runs:
    """``runs`` with every shared tuple replaced by ``shared_map(shared)`` and every run's own
    messages by ``own_map(own)``; both map element by element (same length, same order).
    ``shared_map`` is called once per run: memoize it by identity, so the workloads holding
    one shared tuple get one mapped tuple (which the next pass memoizes in turn)."""
    out: list[Run] = []
    for shared, start, stop, mine in runs:
        mapped_shared = shared_map(shared) if stop > start else EMPTY
        out.append(
            (
                mapped_shared,
                start if stop > start else 0,
                stop if stop > start else 0,
                tuple(own_map(mine)) if mine else EMPTY,
            )
        )
    return tuple(out)


__all__ = ["EMPTY", "Run", "Runs", "flat", "mapped", "merged", "own", "without"]
