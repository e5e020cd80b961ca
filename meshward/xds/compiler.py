"""The bridge from meshward.compile to the control plane: one workload -> resource protos."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from meshward.policy import PolicySet, Workload
from meshward.xds.controlplane import WorkloadCompiler
from meshward.xds.jwks import JwksCache


def compiler_for(options: Any = None, jwks: JwksCache | None = None) -> WorkloadCompiler:
    """A :data:`WorkloadCompiler` over :func:`meshward.compile.compile_workload` in xDS mode.

    ``options``: a :class:`meshward.compile.CompileOptions` (its ``mode`` is forced to XDS:
    routes over RDS, endpoints over EDS, secrets over SDS). ``jwks``: the fetched JWKS
    documents each compile inlines (default: a new cache, which XdsService keeps fetching;
    it is the returned function's ``jwks`` attribute).
    """
    from dataclasses import replace

    from meshward.compile import CompileOptions, Mode, compile_workload
    from meshward.compile.envoy_limits import check_resources

    options = replace(options or CompileOptions(), mode=Mode.XDS)

    cache = jwks if jwks is not None else JwksCache()

    def compile_one(policy: PolicySet, workload: Workload, now: datetime) -> Sequence[Any]:
        # the documents are a snapshot (replaced whole on change): compile stays pure
        compiled = compile_workload(
            policy, workload, replace(options, jwks=cache.documents), now=now
        )
        check_resources(compiled)  # backstop: never serve what Envoy would refuse
        return [message for messages in compiled.by_type().values() for message in messages]

    compile_one.jwks = cache  # type: ignore[attr-defined]
    return compile_one
