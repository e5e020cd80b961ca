"""Runs of shared tuples (meshward.compile.spliced): a workload's resources described as slices
of mesh-wide tuples plus its own messages are exactly its flat resources, for the splice
operations themselves and for every workload of a worst-case mesh (everyone may call everyone
else) over random edit sequences, compiled incrementally."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from hypothesis import HealthCheck, given, settings

from meshward.compile import CompileOptions, compile_mesh, spliced
from meshward.compile.incremental import CompileState, compile_incremental
from meshward.compile.workload import WorkloadResources, _merged
from tests.unit.compile.test_incremental import EDIT_SEQUENCES, T0, apply_edit, assert_equal, full
from tests.unit.compile.test_outbound import mixed


@dataclasses.dataclass(frozen=True)
class Named:
    name: str
    n: int


def test_without_and_merged_equal_the_flat_operations() -> None:
    """Random shared tuples, cuts and own messages (equal names included: own first, as the
    stable merge puts them): the runs describe exactly what cutting and merging the flat
    tuples gives."""
    rng = random.Random(14)
    for trial in range(500):
        names = sorted(f"n{rng.randrange(40):02d}" for _ in range(rng.randrange(0, 30)))
        shared = tuple(Named(name, i) for i, name in enumerate(names))
        cut = tuple(
            sorted(rng.sample(range(len(shared)), rng.randrange(0, min(4, len(shared)) + 1)))
        )
        runs = spliced.without(shared, cut)
        many = tuple(m for i, m in enumerate(shared) if i not in cut)
        assert spliced.flat(runs) == many, trial
        few = tuple(
            Named(name, -1 - i)
            for i, name in enumerate(
                sorted(f"n{rng.randrange(41):02d}" for _ in range(rng.randrange(0, 5)))
            )
        )
        merged, merged_runs = spliced.merged(few, many, runs)
        assert merged == _merged(few, many), trial
        assert spliced.flat(merged_runs) == merged, trial
        # Every message of the shared tuple still comes from a slice of it (not copied into
        # the workload's own messages): the passes then do it once per shared tuple.
        owned = {id(m) for _, _, _, mine in merged_runs for m in mine}
        assert owned == {id(m) for m in few}, trial
        doubled = spliced.mapped(
            merged_runs, lambda t: tuple(m.n * 2 for m in t), lambda t: [m.n * 2 for m in t]
        )
        assert spliced.flat(doubled) == tuple(m.n * 2 for m in merged), trial


def test_mapped_calls_the_shared_map_once_per_run_and_never_for_an_empty_slice() -> None:
    shared = tuple(Named(f"n{i}", i) for i in range(6))
    runs = (
        *spliced.without(shared, (2,)),
        (spliced.EMPTY, 0, 0, (Named("z", 9),)),
        (shared, 3, 3, ()),
    )
    seen: list[tuple[Any, ...]] = []

    def shared_map(t: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(t)
        return tuple(m.n for m in t)

    out = spliced.mapped(runs, shared_map, lambda t: [m.n for m in t])
    assert spliced.flat(out) == (0, 1, 3, 4, 5, 9)
    assert seen == [shared, shared]


def assert_runs_are_the_resources(results: dict[str, WorkloadResources] | Any) -> int:
    """Every result's runs describe its flat tuples; how many results have runs."""
    with_runs = 0
    for ref, result in results.items():
        flat = (result.listeners, result.routes, result.clusters, result.endpoints)
        if result.runs is not None:
            with_runs += 1
            assert tuple(spliced.flat(r) for r in result.runs) == flat, ref
        by_type = result.by_type()
        runs_by_type = result.runs_by_type()
        assert list(runs_by_type) == list(by_type)
        assert {t: spliced.flat(r) for t, r in runs_by_type.items()} == by_type, ref
    return with_runs


def test_a_worst_case_mesh_is_described_by_runs_of_shared_tuples() -> None:
    ps = mixed(10)
    results = compile_mesh(ps, CompileOptions())
    assert assert_runs_are_the_resources(results) == len(results)
    # The callers share their lists: one listeners tuple behind every HTTP-only caller.
    shared = {
        id(shared_tuple)
        for result in results.values()
        for shared_tuple, _, stop, _ in result.runs[0]  # type: ignore[index]
        if stop
    }
    assert len(shared) <= 2  # per distinct caller part


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDIT_SEQUENCES)
def test_runs_equal_the_flat_resources_over_random_edits(edits: list[tuple[str, int]]) -> None:
    """Compiled incrementally through random edits of a worst-case mesh, every workload's runs
    equal its flat resources, and the flat resources equal a compile from scratch."""
    options = CompileOptions()
    ps, now = mixed(7), T0
    state: CompileState
    state, _ = compile_incremental(ps, options, now=now)
    assert assert_runs_are_the_resources(state.results) == len(state.results)
    for edit, pick in edits:
        ps, now = apply_edit(ps, edit, pick, now)
        state, _ = compile_incremental(ps, options, now=now, previous=state)
        assert_runs_are_the_resources(state.results)
        assert_equal(state, full(ps, options, now))
