"""A compiler hook that makes real Envoy NACK a workload's authorization rules on demand.

Tests of NACK handling (status, metrics, "not enforced", keeping the last good rules) need a
route configuration that passes the control plane's checks but that Envoy refuses. This hook
gives the chosen workloads' inbound route configurations a per-filter config of a type Envoy
does not have: a semantic error, so Envoy rejects that route configuration only (where the
authorization rules live) and keeps serving the one it had.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import empty_pb2

ROUTE_CONFIGURATION = "envoy.config.route.v3.RouteConfiguration"


class BreakRoutes:
    """``Mesh(..., compiler_hook=BreakRoutes())``; put a workload ref in :attr:`broken` to have
    its next inbound route configurations NACKed, take it out to have them accepted again."""

    def __init__(self) -> None:
        self.broken: set[str] = set()

    def __call__(self, workload: Any, messages: list[Any]) -> list[Any]:
        if workload.ref not in self.broken:
            return messages
        out = []
        for message in messages:
            if message.DESCRIPTOR.full_name == ROUTE_CONFIGURATION and (
                message.name.startswith("inbound|")
            ):
                message = type(message).FromString(message.SerializeToString())
                bogus = message.virtual_hosts[0].typed_per_filter_config["meshward.test.unknown"]
                bogus.Pack(empty_pb2.Empty())
            out.append(message)
        return out
