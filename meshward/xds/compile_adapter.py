"""The bridge from meshward.compile to the control plane: one workload -> resource protos, and
the whole mesh incrementally (meshward.compile.incremental)."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from meshward.compile import spliced
from meshward.policy import PolicySet, Workload
from meshward.xds.compiling import ConfigCompiler, LocalCompile, Messages, Outcome
from meshward.xds.jwks import JwksCache

#: id(message) -> (the message, kept alive so its id is not reused; its problems)
Checked = dict[int, tuple[Any, list[str]]]
#: id(shared tuple) -> (the tuple, kept alive; (position, problems) of its refused messages)
CheckedShared = dict[int, tuple[tuple[Any, ...], list[tuple[int, list[str]]]]]
_POSITION = operator.itemgetter(0)


class MeshCompiler:
    """A :data:`meshward.xds.compiling.WorkloadCompiler` over
    :func:`meshward.compile.compile_workload` in xDS mode, which also compiles the whole mesh
    incrementally (:meth:`mesh`, what the control plane calls)."""

    def __init__(
        self,
        options: Any = None,
        *,
        agent_secrets: bool = True,
        jwks: JwksCache | None = None,
        process: bool = False,
    ) -> None:
        from meshward.compile import CompileOptions, Mode
        from meshward.compile.envoy_limits import check_resources

        self._given = options
        self._agent_secrets = agent_secrets
        self._process = process
        self._options = replace(options or CompileOptions(), mode=Mode.XDS)
        # The fetched JWKS documents each compile inlines (XdsService keeps fetching them).
        self.jwks = jwks if jwks is not None else JwksCache()
        # Secrets from each node's `meshward agent` (meshward.xds.agentsds), not over ADS; the
        # rewrite is memoized by object identity, so shared protos stay shared (packed once).
        self._agent: Any = None
        if agent_secrets:
            from meshward.xds.agentsds import SecretsFromAgent

            self._agent = SecretsFromAgent()
        self._check = check_resources
        # ref -> (the result Envoy would refuse, why): an unchanged result stays refused
        self._refused: dict[str, tuple[Any, str]] = {}
        # id(message) -> (the message, kept alive so its id is not reused; its problems): the
        # Envoy-limits check of a message shared by many workloads (a peer's outbound cluster,
        # route and listener) runs once, not once per caller. Bounded by the compiled mesh.
        self._checked: Checked = {}
        # The same for the shared tuples of mesh-wide lists (meshward.compile.spliced): each is
        # checked once per compile, not once per workload holding a run of it.
        self._checked_shared: CheckedShared = {}
        # ref -> (its compile result, the message list handed out for it): a result with the
        # same messages hands out the same list, which the packing step recognizes and skips.
        self._handed: dict[str, tuple[Any, Sequence[Any]]] = {}

    @property
    def options(self) -> Any:
        """The options with the JWKS documents in force (a snapshot, replaced whole on change:
        compile stays pure, and an unchanged snapshot keeps the incremental state valid)."""
        return replace(self._options, jwks=self.jwks.documents)

    def __call__(self, policy: PolicySet, workload: Workload, now: datetime) -> Sequence[Any]:
        from meshward.compile import compile_workload

        compiled = compile_workload(policy, workload, self.options, now=now)
        self._check(compiled)  # backstop: never serve what Envoy would refuse
        return self._secrets([m for messages in compiled.by_type().values() for m in messages])

    def config_compiler(self) -> ConfigCompiler:
        """How the control plane runs this compiler: in a worker process of its own
        (meshward.xds.compile_process) when made with ``process=True``, else in this one."""
        if self._process:
            from meshward.xds.compile_process import CompileProcess

            return CompileProcess(self._given, self._agent_secrets, self.jwks)
        return LocalCompile(self.mesh)

    def _secrets(self, messages: list[Any]) -> list[Any]:
        return self._agent(messages) if self._agent is not None else messages

    def mesh(
        self, policy: PolicySet, now: datetime, previous: Any
    ) -> tuple[Any, Mapping[str, Outcome]]:
        """Every workload, reusing ``previous`` (a CompileState, or None) where the edit did
        not reach; failed workloads map to their error."""
        from meshward.compile.incremental import compile_incremental

        state, recompiled = compile_incremental(policy, self.options, now=now, previous=previous)
        out: dict[str, Outcome] = dict(state.errors)
        refused: dict[str, tuple[Any, str]] = {}
        checked: Checked = {}
        checked_shared: CheckedShared = {}
        handed: dict[str, tuple[Any, Sequence[Any]]] = {}
        recompiled_refs = recompiled.workloads  # a union of sets: not once per workload
        for ref, compiled in state.results.items():
            # The Envoy-limits backstop, only where something was recompiled: the rest was
            # checked when it was built (and stays refused while it is the same result).
            earlier = self._refused.get(ref)
            if earlier is not None and earlier[0] is compiled:
                refused[ref] = earlier
            elif ref in recompiled_refs or previous is None:
                problems = self._problems(compiled, checked, checked_shared)
                if problems:
                    reason = f"{compiled.workload}: " + "; ".join(problems[:3])
                    refused[ref] = (compiled, f"ValueError: {reason}")
            if ref in refused:
                out[ref] = refused[ref][1]
                continue
            prior = self._handed.get(ref)
            if prior is not None and _same_messages(prior[0], compiled):
                handed[ref] = prior
            else:
                handed[ref] = (compiled, self._handout(compiled))
            out[ref] = handed[ref][1]
        self._refused = refused
        self._handed = handed
        self._checked = checked
        self._checked_shared = checked_shared
        return state, out

    def _handout(self, compiled: Any) -> Messages:
        """The messages handed out for a result, with their secrets from the agent: each shared
        tuple rewritten once (SecretsFromAgent.shared), the workload's own messages one by one;
        the runs go with them (packing and fingerprinting work per shared tuple too)."""
        runs = tuple(run for group in compiled.runs_by_type().values() for run in group)
        if self._agent is not None:
            runs = spliced.mapped(runs, self._agent.shared, self._agent)
        return Messages(runs)

    def _problems(
        self, compiled: Any, checked: Checked, checked_shared: CheckedShared
    ) -> list[str]:
        """What :func:`check_resources` finds, in message order, each distinct message checked
        once and each shared tuple once (a refused message in it refuses every holder)."""
        from meshward.compile.envoy_limits import message_problems

        problems: list[str] = []
        previous = self._checked
        for runs in compiled.runs_by_type().values():
            for shared, start, stop, mine in runs:
                if stop > start:
                    found = self._shared_problems(shared, checked, checked_shared)
                    if found:
                        lo = bisect.bisect_left(found, start, key=_POSITION)
                        hi = bisect.bisect_left(found, stop, key=_POSITION)
                        for _, listed in found[lo:hi]:
                            problems.extend(listed)
                for message in mine:  # (inlined: _message_problems)
                    key = id(message)
                    hit = checked.get(key) or previous.get(key)
                    if hit is None or hit[0] is not message:
                        hit = (message, message_problems(message))
                    checked[key] = hit
                    problems.extend(hit[1])
        return problems

    def _shared_problems(
        self, shared: tuple[Any, ...], checked: Checked, checked_shared: CheckedShared
    ) -> list[tuple[int, list[str]]]:
        key = id(shared)
        hit = checked_shared.get(key)
        if hit is not None and hit[0] is shared:
            return hit[1]
        hit = self._checked_shared.get(key)
        if hit is None or hit[0] is not shared:
            found = [
                (i, listed)
                for i, message in enumerate(shared)
                if (listed := self._message_problems(message, checked))
            ]
            hit = (shared, found)
        else:  # checked by the previous compile: keep its messages' entries for the next
            for message in shared:
                if (entry := self._checked.get(id(message))) is not None:
                    checked[id(message)] = entry
        checked_shared[key] = hit
        return hit[1]

    def _message_problems(self, message: Any, checked: Checked) -> list[str]:
        from meshward.compile.envoy_limits import message_problems

        key = id(message)
        hit = checked.get(key) or self._checked.get(key)
        if hit is None or hit[0] is not message:
            hit = (message, message_problems(message))
        checked[key] = hit
        return hit[1]


def _same_messages(a: Any, b: Any) -> bool:
    """The same message tuples (an unchanged workload's result is re-stamped with the new
    policy version by the incremental compiler, its messages kept)."""
    if a is b:
        return True
    mine, theirs = a.by_type(), b.by_type()
    return mine.keys() == theirs.keys() and all(mine[t] is theirs[t] for t in mine)


def compiler_for(
    options: Any = None,
    *,
    agent_secrets: bool = True,
    jwks: JwksCache | None = None,
    process: bool = False,
) -> MeshCompiler:
    """The control plane's compiler for a mesh's CompileOptions (its ``mode`` is forced to
    XDS: routes over RDS, endpoints over EDS, secrets over SDS). ``agent_secrets`` (default):
    secrets come from each node's `meshward agent` over its Unix socket
    (:mod:`meshward.xds.agentsds`; files for `meshward bootstrap` nodes, :mod:`meshward.xds.filesds`);
    False leaves the compiler's ``ads`` references, which the control plane cannot serve (it holds
    no workload SVID): only for looking at the compiler's own output.
    ``jwks``: the JWKS cache (default: a new one, which XdsService keeps fetching).
    ``process``: the control plane compiles in a worker process of its own (`xds serve`), so a
    mesh-wide recompile never holds the interpreter its streams are served from."""
    return MeshCompiler(options, agent_secrets=agent_secrets, jwks=jwks, process=process)
