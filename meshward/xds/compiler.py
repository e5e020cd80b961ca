"""The bridge from meshward.compile to the control plane: one workload -> resource protos, and
the whole mesh incrementally (meshward.compile.incremental)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from meshward.policy import PolicySet, Workload
from meshward.xds.compiling import Outcome


class MeshCompiler:
    """A :data:`meshward.xds.compiling.WorkloadCompiler` over
    :func:`meshward.compile.compile_workload` in xDS mode, which also compiles the whole mesh
    incrementally (:meth:`mesh`, what the control plane calls)."""

    def __init__(self, options: Any = None) -> None:
        from meshward.compile import CompileOptions, Mode

        self.options = replace(options or CompileOptions(), mode=Mode.XDS)

    def __call__(self, policy: PolicySet, workload: Workload, now: datetime) -> Sequence[Any]:
        from meshward.compile import compile_workload

        compiled = compile_workload(policy, workload, self.options, now=now)
        return [message for messages in compiled.by_type().values() for message in messages]

    def mesh(
        self, policy: PolicySet, now: datetime, previous: Any
    ) -> tuple[Any, Mapping[str, Outcome]]:
        """Every workload, reusing ``previous`` (a CompileState, or None) where the edit did
        not reach; failed workloads map to their error."""
        from meshward.compile.incremental import compile_incremental

        state, _ = compile_incremental(policy, self.options, now=now, previous=previous)
        out: dict[str, Outcome] = dict(state.errors)
        for ref, compiled in state.results.items():
            out[ref] = [m for messages in compiled.by_type().values() for m in messages]
        return state, out


def compiler_for(options: Any = None) -> MeshCompiler:
    """The control plane's compiler for a mesh's CompileOptions (its ``mode`` is forced to
    XDS: routes over RDS, endpoints over EDS, secrets over SDS)."""
    return MeshCompiler(options)
