"""Compile time at fleet scale: full compile, one-policy edit, mesh-wide edit (CPU seconds).

On the realistic topologies of meshward.testing.topology (fleet: ~10 named callers per service
plus namespace-wide rules; worst: one namespace-wide ALLOW over N services), every size in one
process, one after another (CPU time, so other load on the machine moves the figures less).
"full" is compile_mesh (every workload from scratch); the edits are compile_incremental from
the previous state (meshward.compile.incremental): the methods of one service's ALLOW, then a
root-namespace DENY that selects every workload.

    python bench/compile_scale.py [--topology fleet,worst] [--fleet 100,300,1000]
                                  [--worst 100,200,400] [--gc worker|on] [--repeat N]

Growth is printed for each step between consecutive sizes (the worst-case target: full compile
300 -> 1,000 services <= 4x).

"stage full" / "stage mesh" are the control plane's whole compile stage as `xds serve` runs it
in its worker (meshward.xds.compiling.LocalCompile over the product's compiler: the compile in
xDS mode, the Envoy-limits backstop, the agent-secret rewrite and the packing); it keeps state,
so ``--repeat`` repeats the whole full -> one-policy -> mesh-wide sequence on a new stage.

``--gc worker`` (the default) compiles as the control plane's compile worker does
(meshward.xds.compile_process): the cyclic collector off, the heap frozen before each step.
``--gc on`` leaves the interpreter's collector on, which adds passes over a heap that grows with
the output (at 1,000 worst-case services, about 0.1-0.3 s of the full compile).
``--repeat N`` times each compile_mesh / compile_incremental step N times and keeps the least
(other load on a shared machine only ever adds).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import time
from datetime import UTC, datetime
from typing import Any

from meshward.compile import CompileOptions, compile_mesh
from meshward.compile.incremental import compile_incremental
from meshward.policy.model import Action, AuthorizationPolicy, Operation, Rule
from meshward.policy.policyset import PolicySet
from meshward.testing import topology
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.compiling import LocalCompile


#: How each step runs: "worker" (as meshward.xds.compile_process: collector off, heap frozen)
#: or "on" (the interpreter's default); and how many times (the least is kept).
@dataclasses.dataclass
class Settings:
    gc: str = "worker"
    repeat: int = 1


SETTINGS = Settings()


def cpu(fn: Any, repeat: int | None = None) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(SETTINGS.repeat if repeat is None else repeat):
        result = None  # the previous run's output is not the next run's heap
        gc.collect()
        if SETTINGS.gc == "worker":
            gc.freeze()
            gc.disable()
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
        gc.enable()
    return best, result


def edits(ps: PolicySet) -> tuple[PolicySet, PolicySet]:
    policies = list(ps.authorization_policies)
    target = next((p for p in policies if p.selector is not None), policies[0])
    rule = target.rules[0]
    policies[policies.index(target)] = dataclasses.replace(
        target, rules=(dataclasses.replace(rule, operations=(Operation(methods=("PUT",)),)),)
    )
    one = PolicySet.create(mesh=ps.mesh, workloads=ps.workloads, authorization_policies=policies)
    deny = AuthorizationPolicy(
        namespace=ps.mesh.root_namespace,
        name="deny-debug",
        action=Action.DENY,
        rules=(Rule(operations=(Operation(paths=("/debug",)),)),),
    )
    mesh = PolicySet.create(
        mesh=ps.mesh, workloads=ps.workloads, authorization_policies=[*policies, deny]
    )
    return one, mesh


def measure(kind: str, n: int) -> dict[str, float]:
    ps = topology.worst_case(n) if kind == "worst" else topology.fleet(n)
    options = CompileOptions()
    full, compiled = cpu(lambda: compile_mesh(ps, options))
    resources = sum(
        len(r.listeners) + len(r.routes) + len(r.clusters) + len(r.endpoints)
        for r in compiled.values()
    )
    del compiled
    cold, (state, _) = cpu(lambda: compile_incremental(ps, options))
    one_ps, mesh_ps = edits(ps)
    one, (state, one_done) = cpu(
        lambda before=state: compile_incremental(one_ps, options, previous=before)
    )
    mesh, (state, _) = cpu(
        lambda before=state: compile_incremental(mesh_ps, options, previous=before)
    )
    one_halves = len(one_done.inbound) + len(one_done.outbound)
    # Let go of the steps above before the stage runs: at 1,000 worst-case services their
    # state is ~4 M message references, which the stage's own compile would run beside (a
    # cold worker has none of it: 2.4-2.9 s with it alive, 1.85-1.95 s without).
    del state, one_done
    stage_full, stage_mesh = stage_steps(ps, one_ps, mesh_ps, options)
    return {
        "stage_full": stage_full,
        "stage_mesh": stage_mesh,
        "full": full,
        "cold": cold,
        "one": one,
        "one_halves": one_halves,
        "mesh": mesh,
        "resources": resources,
    }


def stage_steps(ps: Any, one_ps: Any, mesh_ps: Any, options: Any) -> tuple[float, float]:
    """The control plane's whole compile stage, as `xds serve` runs it in its worker: the
    compile (xDS mode), the Envoy-limits backstop, the agent-secret rewrite and the packing;
    full, then the one-policy edit, then the mesh-wide one. The stage keeps state (a second
    run of a step finds nothing changed), so ``--repeat`` runs the whole sequence on a new
    stage each time, keeping the least of each step (a single run at 300 worst-case services,
    0.2-0.9 s, moved the growth figure between 2.3x and 5.6x)."""
    full = mesh = float("inf")
    now = datetime.now(UTC)
    for _ in range(SETTINGS.repeat):
        stage = LocalCompile(compiler_for(options).mesh)
        took, first = cpu(lambda stage=stage: stage(ps, now, {}), repeat=1)
        full = min(full, took)
        _, second = cpu(lambda s=stage, f=first: s(one_ps, now, f.configs), repeat=1)
        del first
        took, _ = cpu(lambda s=stage, c=second: s(mesh_ps, now, c.configs), repeat=1)
        mesh = min(mesh, took)
        del stage, second
    return full, mesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="fleet,worst")
    parser.add_argument("--fleet", default="100,300,1000")
    parser.add_argument("--worst", default="100,200,400")
    parser.add_argument("--gc", choices=["worker", "on"], default="worker",
                        help="the cyclic collector as the compile worker runs it (off, heap "
                        "frozen) or on (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="time each step N times, keep the least (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat: at least 1")
    SETTINGS.gc, SETTINGS.repeat = args.gc, args.repeat
    print(f"compile CPU seconds (one process, gc {args.gc}, "
          f"least of {args.repeat} per step)")  # fmt: skip
    print(f"{'topology':>8} {'services':>8} {'resources':>9} {'full':>7} {'1-edit':>7} "
          f"{'halves':>6} {'mesh-wide':>9} {'stage full':>10} {'stage mesh':>10}")  # fmt: skip
    for kind in args.topology.split(","):
        sizes = [int(s) for s in getattr(args, kind).split(",")]
        rows = [(n, measure(kind, n)) for n in sizes]
        for n, m in rows:
            print(f"{kind:>8} {n:8d} {m['resources']:9.0f} {m['full']:7.2f} {m['one']:7.3f} "
                  f"{m['one_halves']:6.0f} {m['mesh']:9.2f} {m['stage_full']:10.2f} "
                  f"{m['stage_mesh']:10.2f}")  # fmt: skip
        for (a, first), (b, last) in itertools.pairwise(rows):
            print(f"{kind:>8} growth {a} -> {b} services ({b / a:.1f}x): full compile "
                  f"{last['full'] / first['full']:.1f}x, mesh-wide edit {last['mesh'] / first['mesh']:.1f}x, "
                  f"resources {last['resources'] / first['resources']:.1f}x; the control "
                  f"plane's stage: full {last['stage_full'] / first['stage_full']:.1f}x, "
                  f"mesh-wide {last['stage_mesh'] / first['stage_mesh']:.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
