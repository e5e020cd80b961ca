"""The bridge from meshward.compile to the control plane: one workload -> resource protos."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from meshward.policy import PolicySet, Workload
from meshward.xds.controlplane import WorkloadCompiler


def compiler_for(options: Any = None, *, agent_secrets: bool = False) -> WorkloadCompiler:
    """A :data:`WorkloadCompiler` over :func:`meshward.compile.compile_workload` in xDS mode.

    ``options``: a :class:`meshward.compile.CompileOptions` (its ``mode`` is forced to XDS:
    routes over RDS, endpoints over EDS, secrets over SDS). ``agent_secrets``: secrets come from
    each node's `meshward agent` over its Unix socket (:mod:`meshward.xds.agentsds`), not ADS.
    """
    from dataclasses import replace

    from meshward.compile import CompileOptions, Mode, compile_workload
    from meshward.compile.envoy_limits import check_resources

    options = replace(options or CompileOptions(), mode=Mode.XDS)
    rewrite = None
    if agent_secrets:
        from meshward.xds.agentsds import SecretsFromAgent

        rewrite = SecretsFromAgent()

    def compile_one(policy: PolicySet, workload: Workload, now: datetime) -> Sequence[Any]:
        compiled = compile_workload(policy, workload, options, now=now)
        check_resources(compiled)  # backstop: never serve what Envoy would refuse
        messages = [message for messages in compiled.by_type().values() for message in messages]
        return rewrite(messages) if rewrite is not None else messages

    return compile_one
