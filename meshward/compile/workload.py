"""The compiler's entry points: a policy set and a workload in, Envoy resources out.

Pure: no I/O, no clock (pass ``now`` to drop expired emergency policies), and the same input
gives byte-identical output (resources sorted by name, names derived from the input only,
serialized with ``deterministic=True``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from meshward.compile import authz, listeners, names, tls
from meshward.compile import protos as _protos
from meshward.compile.classify import Placement
from meshward.compile.options import CompileOptions, Mode
from meshward.compile.peers import next_expiry, peers_of
from meshward.errors import UserError
from meshward.policy.model import JwtEnforcement, MtlsMode, Workload

if TYPE_CHECKING:
    from meshward.policy.policyset import PolicySet

Json = dict[str, Any]

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True)
class WorkloadResources:
    """Everything one sidecar needs, except the secrets' content (served by SDS by name)."""

    workload: str  # "ns/name"
    policy_version: str
    mode: Mode
    listeners: tuple[Any, ...]  # envoy.config.listener.v3.Listener, sorted by name
    routes: tuple[Any, ...]  # RouteConfiguration (xDS mode; inline in static mode)
    clusters: tuple[Any, ...]  # Cluster
    endpoints: tuple[Any, ...]  # ClusterLoadAssignment (xDS mode; inline in static mode)
    secret_names: tuple[str, ...]  # SDS names referenced: ("ROOTCA", "default") or ()
    plan: authz.AuthzPlan
    # Earliest expiry that can change this output (its own policies; with outbound, any
    # policy's, since a peer's emergency ALLOW decides whether it may call that peer).
    next_change: datetime | None

    @property
    def extauthz(self) -> bool:
        """The inbound HTTP chains have an ext_authz filter (rules that need it, or tokens to
        verify)."""
        return self.plan.uses_extauthz

    def by_type(self) -> dict[str, tuple[Any, ...]]:
        """Type URL -> messages, for the xDS server."""
        return {
            CLUSTER: self.clusters,
            ENDPOINT: self.endpoints,
            LISTENER: self.listeners,
            ROUTE: self.routes,
        }

    def serialize(self) -> bytes:
        """Every resource, deterministically serialized and concatenated (for equality tests)."""
        out = bytearray()
        for type_url, messages in sorted(self.by_type().items()):
            for message in messages:
                data = message.SerializeToString(deterministic=True)
                out += f"{type_url}\n{len(data)}\n".encode() + data
        return bytes(out)

    def to_json(self) -> Json:
        """Envoy's JSON form of every resource (golden files, ``meshward policy compile``)."""
        return {
            "workload": self.workload,
            "policy_version": self.policy_version,
            "mode": self.mode.value,
            "secret_names": list(self.secret_names),
            "listeners": [to_dict(m) for m in self.listeners],
            "routes": [to_dict(m) for m in self.routes],
            "clusters": [to_dict(m) for m in self.clusters],
            "endpoints": [to_dict(m) for m in self.endpoints],
        }


def to_dict(message: Any) -> Json:
    result: Json = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def compile_workload(
    policy_set: PolicySet,
    workload: Workload | str,
    options: CompileOptions | None = None,
    *,
    now: datetime | None = None,
    _memo: dict[tuple[str, str], Any] | None = None,
) -> WorkloadResources:
    """Compile one workload's sidecar config (inbound, outbound, infrastructure clusters).

    ``now``: policies whose ``meshward.dev/expires-at`` has passed are left out, and
    ``next_change`` says when the next one expires (recompile and push then). None keeps every
    policy (a pure function of the policy set alone). Raises UserError for an unknown workload
    ref, or when a rule needs ext_authz and ``options.extauthz`` is unset.
    """
    options = options or CompileOptions()
    memo = _memo if _memo is not None else {}
    if isinstance(workload, str):
        found = policy_set.workload(workload)
        if found is None:
            raise UserError(
                f"no workload {workload!r} in the policy set; declare it (kind: Workload) or "
                "check the NAMESPACE/NAME spelling"
            )
        workload = found
    trust_domain = policy_set.mesh.trust_domain
    policies = policy_set.policies_for(workload, now)
    plan = authz.plan(
        policies,
        policy_set.request_authentications_for(workload),
        jwt_native=policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE,
    )
    port_map = options.runtime_ports(workload)
    built: list[listeners.Built] = []
    tls_used = False
    for port in sorted(workload.ports, key=lambda p: p.port):
        mode = policy_set.mtls_mode(workload, port.port)
        tls_used = tls_used or mode is not MtlsMode.DISABLE
        build = listeners.inbound_http if listeners.is_http(port) else listeners.inbound_tcp
        built.append(
            build(
                workload,
                port,
                plan=plan,
                port_map=port_map,
                mode=mode,
                options=options,
                trust_domain=trust_domain,
            )
        )
    if options.outbound:
        index = _outbound_index(policy_set)
        for peer in peers_of(policy_set, workload, now):
            for port in sorted(peer.ports, key=lambda p: p.port):
                peer_mode = policy_set.mtls_mode(peer, port.port)
                tls_used = tls_used or peer_mode is not MtlsMode.DISABLE
                bind = options.outbound_endpoint(
                    workload, peer, port.port, index[names.peer_key(peer, port.port)]
                )
                built.append(
                    listeners.outbound(
                        workload,
                        peer,
                        port,
                        bind=bind,
                        peer_mode=peer_mode,
                        options=options,
                        trust_domain=trust_domain,
                    )
                )
    clusters = [c for b in built for c in b.clusters]
    if plan.uses_extauthz and any(listeners.is_http(p) for p in workload.ports):
        if options.extauthz is None:
            raise UserError(
                f"workload {workload.ref} needs the ext_authz service "
                f"({plan.extauthz_reasons[0]}) but no ext_authz address was given; "
                "set it (e.g. --extauthz 127.0.0.1:9191)"
            )
        # mTLS to ext_authz with the workload's own SVID (ext_authz answers a sidecar only about
        # its own workload), pinned to ext_authz's identity (issue 13).
        extauthz = listeners.grpc_cluster(names.CLUSTER_EXTAUTHZ, options.extauthz, options)
        extauthz["transport_socket"] = tls.upstream_tls(
            options.mode, names.extauthz_spiffe_id(policy_set.mesh), alpn=["h2"]
        )
        clusters.append(extauthz)
        tls_used = True
    if options.otlp is not None:
        clusters.append(listeners.grpc_cluster(names.CLUSTER_OTLP, options.otlp, options))
    expiries = [
        p.expires_at
        for p in policies
        if p.expires_at is not None and (now is None or p.expires_at > now)
    ]
    if options.outbound and now is not None:
        peer_change = next_expiry(policy_set, now)  # callers' outbound follows peers' expiry
        expiries.extend([peer_change] if peer_change is not None else [])
    return WorkloadResources(
        workload=workload.ref,
        policy_version=policy_set.version,
        mode=options.mode,
        listeners=_sorted(_listener(memo, b) for b in built),
        routes=_sorted(_shared(memo, "route", b.route) for b in built if b.route is not None),
        clusters=_sorted(_shared(memo, "cluster", c) for c in clusters),
        endpoints=_sorted(
            (_shared(memo, "endpoint", e) for b in built for e in b.endpoints),
            key="cluster_name",
        ),
        secret_names=(names.SECRET_ROOTCA, names.SECRET_DEFAULT) if tls_used else (),
        plan=plan,
        next_change=min(expiries) if expiries else None,
    )


def compile_mesh(
    policy_set: PolicySet,
    options: CompileOptions | None = None,
    *,
    now: datetime | None = None,
) -> dict[str, WorkloadResources]:
    """Every workload of the mesh, by ref.

    Resources that are the same for every caller (a peer's outbound cluster, endpoints and
    route) are converted to protos once and copied, which is most of the outbound work.
    """
    memo: dict[tuple[str, str], Any] = {}
    return {
        w.ref: compile_workload(policy_set, w, options, now=now, _memo=memo)
        for w in policy_set.workloads
    }


_PARSERS = {"route": _protos.route, "cluster": _protos.cluster, "endpoint": _protos.endpoint}


def _listener(memo: dict[tuple[str, str], Any], built: listeners.Built) -> Any:
    """Outbound listeners of one workload differ only in their name, bind address, stat prefix
    and route (HTTP) or cluster (TCP): parse one template per shape and patch those fields,
    which gives the same bytes as parsing each (tests check it) at a fraction of the cost."""
    data = built.listener
    if data.get("traffic_direction") != "OUTBOUND":
        return _protos.listener(data)
    socket = data["address"]["socket_address"]
    inner = data["filter_chains"][0]["filters"][0]["typed_config"]
    template = json.loads(json.dumps(data))
    template["name"] = ""
    template["address"]["socket_address"] = {"address": "", "port_value": 0}
    shape = template["filter_chains"][0]["filters"][0]["typed_config"]
    for name in ("stat_prefix", "cluster"):
        if name in shape:
            shape[name] = ""
    shape.pop("rds", None)
    shape.pop("route_config", None)
    key = ("listener", json.dumps(template, sort_keys=True))
    parsed = memo.get(key)
    if parsed is None:
        parsed = _protos.listener(template)
        memo[key] = parsed
    message = type(parsed)()
    message.CopyFrom(parsed)
    message.name = data["name"]
    message.address.socket_address.address = socket["address"]
    message.address.socket_address.port_value = socket["port_value"]
    typed = message.filter_chains[0].filters[0].typed_config
    config = _protos.unpack(typed)
    config.stat_prefix = inner["stat_prefix"]
    if "cluster" in inner:
        config.cluster = inner["cluster"]
    if "rds" in inner:
        config.rds.config_source.ads.SetInParent()
        config.rds.config_source.resource_api_version = 2  # V3
        config.rds.route_config_name = inner["rds"]["route_config_name"]
    if "route_config" in inner:
        config.route_config.CopyFrom(_shared(memo, "route", inner["route_config"]))
    typed.Pack(config, deterministic=True)
    return message


def _shared(memo: dict[tuple[str, str], Any], kind: str, data: Json) -> Any:
    key = (kind, json.dumps(data, sort_keys=True))
    message = memo.get(key)
    if message is None:
        message = _PARSERS[kind](data)
        memo[key] = message
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def rule_classes(
    policy_set: PolicySet, workload: Workload, *, now: datetime | None = None
) -> authz.AuthzPlan:
    """Where each rule applying to ``workload`` runs (HTTP and TCP), and why."""
    return authz.plan(
        policy_set.policies_for(workload, now),
        policy_set.request_authentications_for(workload),
        jwt_native=policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE,
    )


_OUTBOUND_INDEX: dict[str, dict[str, int]] = {}


def _outbound_index(policy_set: PolicySet) -> Mapping[str, int]:
    """(peer, port) -> position in the sorted registry: the default outbound port offset."""
    hit = _OUTBOUND_INDEX.get(policy_set.version)
    if hit is None:
        keys = sorted(names.peer_key(w, p.port) for w in policy_set.workloads for p in w.ports)
        hit = {key: i for i, key in enumerate(keys)}
        if len(_OUTBOUND_INDEX) >= 4:
            _OUTBOUND_INDEX.pop(next(iter(_OUTBOUND_INDEX)))
        _OUTBOUND_INDEX[policy_set.version] = hit
    return hit


def _sorted(messages: Iterable[Any], *, key: str = "name") -> tuple[Any, ...]:
    return tuple(sorted(messages, key=lambda m: getattr(m, key)))


__all__ = [
    "CLUSTER",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "SECRET",
    "Placement",
    "WorkloadResources",
    "compile_mesh",
    "compile_workload",
    "rule_classes",
]
