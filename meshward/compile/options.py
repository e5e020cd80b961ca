"""What the compiler needs besides the policy set: where things run.

Policies speak in declared service ports (``Workload.ports``). In production (one sidecar per
host or container) the sidecar listens on exactly those ports and nothing is translated. On one
machine every sidecar shares 127.0.0.1, so each gets runtime ports: the bindings say, per
workload and declared port, where the inbound listener binds, where the application listens and
where peers reach the listener, and where each outbound (peer) listener binds. RBAC port
matching is translated to the runtime inbound port, because that is the port Envoy sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from meshward.errors import UserError
from meshward.policy.model import Workload


class Mode(StrEnum):
    """How resources reach Envoy.

    XDS: over ADS from the control plane (SDS/EDS/RDS via ``ads``). STATIC: everything inline in
    a bootstrap's ``static_resources`` (secrets by name from ``static_resources.secrets``, clusters
    with inline endpoints, inline route configs); used by tests and offline validation.
    """

    XDS = "xds"
    STATIC = "static"


class AccessLogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


@dataclass(frozen=True, order=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, value: str) -> Endpoint:
        """``HOST:PORT`` (``[v6]:PORT`` for IPv6)."""
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"expected HOST:PORT, got {value!r} (e.g. 127.0.0.1:9001)")
        return cls(host, int(port))


@dataclass(frozen=True)
class PortBinding:
    """One declared port of one workload at runtime."""

    listen: Endpoint  # where the inbound listener binds
    app: Endpoint  # where the sidecar forwards to (the local application)
    advertise: Endpoint | None = None  # where peers reach the inbound listener (default: listen)

    @property
    def reachable(self) -> Endpoint:
        return self.advertise or self.listen


@dataclass(frozen=True)
class WorkloadBinding:
    ports: Mapping[int, PortBinding] = field(default_factory=dict)  # declared port -> binding
    # "<ns>/<name>:<declared port>" of a peer -> where this sidecar's outbound listener binds.
    outbound: Mapping[str, Endpoint] = field(default_factory=dict)


@dataclass(frozen=True)
class CompileOptions:
    """Everything about the environment; the policy set says everything about intent.

    Workloads missing from ``bindings`` get identity bindings: the inbound listener on
    ``listen_host:<declared port>``, the application on ``app_host:<declared port>`` and peers
    reached at ``<peer address>:<declared port>``. Outbound listeners not bound explicitly get
    ``outbound_host:<outbound_base_port + index>``, the index of the (peer, port) pair in the
    sorted registry, so every sidecar agrees on them.
    """

    mode: Mode = Mode.XDS
    bindings: Mapping[str, WorkloadBinding] = field(default_factory=dict)  # by "ns/name"
    extauthz: Endpoint | None = None  # the ext_authz gRPC service (cluster meshward-extauthz)
    extauthz_timeout_ms: int = 500
    otlp: Endpoint | None = None  # OTLP gRPC collector (cluster meshward-otlp); None: no tracing
    access_log_path: str | None = "/dev/stdout"  # None: no access log
    access_log_format: AccessLogFormat = AccessLogFormat.JSON
    # The cluster reaching the control plane's flow collector (Envoy gRPC ALS); in xDS mode the
    # bootstrap's ``meshward-xds`` (HTTP/2, mTLS as the node's workload). None: no flow logs.
    flow_log_cluster: str | None = None
    outbound: bool = True  # compile outbound listeners and clusters for peers
    listen_host: str = "0.0.0.0"
    app_host: str = "127.0.0.1"
    outbound_host: str = "127.0.0.1"
    outbound_base_port: int = 15100
    connect_timeout_ms: int = 1000
    # Rules naming exact callers go to RBAC's principal-indexed matcher (a hash lookup on the
    # peer's URI SAN) when a workload has at least this many of them for one action; below it,
    # the plain rules engine is simpler and as fast. None: never index.
    rbac_index_min_rules: int | None = 16
    # Fetched JWKS documents by jwksUri (meshward.xds.jwks fetches them; compile does no I/O),
    # inlined into jwt_authn providers. A jwksUri missing here gets no keys: its tokens fail.
    jwks: Mapping[str, str] = field(default_factory=dict, hash=False)

    def port_binding(self, workload: Workload, port: int) -> PortBinding:
        bound = self.bindings.get(workload.ref)
        if bound is not None and port in bound.ports:
            return bound.ports[port]
        if bound is not None and bound.ports:
            raise UserError(
                f"bindings for {workload.ref} do not cover its declared port {port}; "
                "bind every declared port or none"
            )
        return PortBinding(
            listen=Endpoint(self.listen_host, port),
            app=Endpoint(self.app_host, port),
            advertise=Endpoint(workload.address, port),
        )

    def runtime_ports(self, workload: Workload) -> dict[int, int]:
        """Declared port -> the port the inbound listener really binds (what RBAC sees)."""
        return {p.port: self.port_binding(workload, p.port).listen.port for p in workload.ports}

    def outbound_endpoint(
        self, workload: Workload, peer: Workload, port: int, index: int
    ) -> Endpoint:
        key = f"{peer.ref}:{port}"
        bound = self.bindings.get(workload.ref)
        if bound is not None and key in bound.outbound:
            return bound.outbound[key]
        return Endpoint(self.outbound_host, self.outbound_base_port + index)


def runtime_bindings(
    workloads: Iterable[Workload],
    ports: Iterable[int],
    *,
    host: str = "127.0.0.1",
    app_ports: Mapping[tuple[str, int], int] | None = None,
) -> dict[str, WorkloadBinding]:
    """Bindings for a one-machine mesh from a supply of free ports (``meshward.net.free_port``).

    Each declared port gets an inbound runtime port; each workload gets an outbound listener for
    every (other workload, declared port). ``app_ports`` maps (ref, declared port) to where the
    application listens; missing entries take a port from the supply as well.
    """
    supply = iter(ports)
    peers = sorted(workloads, key=lambda w: w.ref)
    inbound: dict[str, dict[int, PortBinding]] = {}
    for w in peers:
        inbound[w.ref] = {}
        for p in sorted(w.ports, key=lambda p: p.port):
            app_port = (app_ports or {}).get((w.ref, p.port)) or next(supply)
            listen = Endpoint(host, next(supply))
            inbound[w.ref][p.port] = PortBinding(listen=listen, app=Endpoint(host, app_port))
    result: dict[str, WorkloadBinding] = {}
    for w in peers:
        outbound = {
            f"{peer.ref}:{p.port}": Endpoint(host, next(supply))
            for peer in peers
            if peer.ref != w.ref
            for p in sorted(peer.ports, key=lambda p: p.port)
        }
        result[w.ref] = WorkloadBinding(ports=inbound[w.ref], outbound=outbound)
    return result
