"""The shape of a service that rides on the control plane without meshward.xds importing it.

The flow collector (meshward.flows.service) shares the ADS server's mTLS port, serves routes on
its admin address and flushes in the background, but flows stands above xds in the layering
(it reads the control plane's policy and admin routes). So :class:`meshward.xds.service.XdsService`
takes a factory of this protocol, and the code above both packages (the ``meshward xds`` group in
meshward/cli/xds.py, the test mesh, the benchmarks) passes the flow service's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import grpc
    from prometheus_client import CollectorRegistry

    from meshward.xds.admin import Route
    from meshward.xds.controlplane import ControlPlane


class AttachedService(Protocol):
    def add_to(self, server: grpc.aio.Server) -> None:
        """Register its gRPC servicer on the ADS server (same port, same mTLS)."""

    def routes(self) -> Mapping[str, Route]:
        """Paths it answers on the admin address."""

    async def run(self) -> None:
        """Background work for as long as the control plane runs (cancelled at stop)."""

    def status(self) -> dict[str, Any]:
        """Its part of ``/status``."""

    def close(self) -> None:
        """Release what it holds (called off the event loop, after the servers stopped)."""


# Called once the control plane exists (the service authorizes callers against it and reads its
# policy), with the control plane's metrics registry.
AttachedServiceFactory = Callable[["ControlPlane", "CollectorRegistry"], AttachedService]
