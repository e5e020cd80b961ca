"""Type URLs the control plane serves, and the order it sends them in.

The order is the make-before-break order of the xDS protocol: a cluster exists before a listener
routes to it, endpoints before the clusters that use them finish warming, secrets before the
listeners whose TLS contexts name them.
"""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

#: Push order within one update of a node.
ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, SECRET, LISTENER, ROUTE)

#: Types whose empty SotW subscription means "everything" (wildcard).
WILDCARD_TYPES: frozenset[str] = frozenset({CLUSTER, LISTENER})

SHORT: dict[str, str] = {
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    SECRET: "SDS",
    LISTENER: "LDS",
    ROUTE: "RDS",
}
BY_SHORT: dict[str, str] = {short: url for url, short in SHORT.items()}


def short(type_url: str) -> str:
    """`CDS`, `LDS`, ... for logs and metrics labels; the last path segment for anything else."""
    return SHORT.get(type_url, type_url.rsplit(".", 1)[-1])
