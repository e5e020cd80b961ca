"""The control plane: ADS (SotW + delta), CSR signing, NACK safety and drift status.

In-process (demo, tests)::

    from meshward.xds import XdsServiceThread, compiler_for
    with XdsServiceThread(None, ca, compiler_for(options), policy_paths=["policies/"]) as xds:
        xds.port, xds.admin_url, xds.status()

As a process: ``meshward xds serve --policy DIR --ca DIR --listen 127.0.0.1:15010``.
Sidecar bootstraps: :func:`meshward.xds.bootstrap.render_bootstrap` (pure); the node side
(key, SVID by CSR, files) is `meshward agent` or `meshward bootstrap` (meshward.agent).
Heavy imports (grpc, protos) happen on first use of a name, so ``meshward --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshward.lazy import lazy_getattr

if TYPE_CHECKING:
    from meshward.xds.bootstrap import AdsCredentials, render_bootstrap
    from meshward.xds.compile_adapter import compiler_for
    from meshward.xds.controlplane import ControlPlane, server_spiffe_id
    from meshward.xds.nodeid import InvalidNodeId, NodeId
    from meshward.xds.server import AdsServer, NodeRejected
    from meshward.xds.service import XdsService, XdsServiceThread

_EXPORTS = {
    "AdsCredentials": "meshward.xds.bootstrap",
    "render_bootstrap": "meshward.xds.bootstrap",
    "compiler_for": "meshward.xds.compile_adapter",
    "ControlPlane": "meshward.xds.controlplane",
    "server_spiffe_id": "meshward.xds.controlplane",
    "InvalidNodeId": "meshward.xds.nodeid",
    "NodeId": "meshward.xds.nodeid",
    "AdsServer": "meshward.xds.server",
    "NodeRejected": "meshward.xds.server",
    "XdsService": "meshward.xds.service",
    "XdsServiceThread": "meshward.xds.service",
}

__all__ = [
    "AdsCredentials",
    "AdsServer",
    "ControlPlane",
    "InvalidNodeId",
    "NodeId",
    "NodeRejected",
    "XdsService",
    "XdsServiceThread",
    "compiler_for",
    "render_bootstrap",
    "server_spiffe_id",
]


__getattr__ = lazy_getattr(__name__, _EXPORTS, globals())
