"""Every name the compiled config uses, in one place.

Names are a contract: the control plane orders pushes by them, the ext_authz service reads the
context extension keys, the denials reader reads the access-log fields and metadata keys, and a
denial's ``rbac_access_denied_matched_policy[...]`` must name the operator's policy. They are
built only from the policy set and the registry, so the same input always yields the same names.
"""

from __future__ import annotations

from meshward.policy.model import MeshConfig, Workload
from meshward.policy.ordering import rule_name

# SDS secret names (Istio's): one SVID per node.
SECRET_DEFAULT = "default"  # the workload's own SVID (tls_certificate)
SECRET_ROOTCA = "ROOTCA"  # the trust bundle (validation_context)

# Infrastructure clusters.
CLUSTER_EXTAUTHZ = "meshward-extauthz"
CLUSTER_XDS = "meshward-xds"
CLUSTER_OTLP = "meshward-otlp"

# The ext_authz service's identity (in the root namespace): its compiled cluster requires a
# server certificate with exactly this SPIFFE ID, as sidecars pin the control plane's.
EXTAUTHZ_SERVICE_ACCOUNT = "meshward-extauthz"


def extauthz_spiffe_id(mesh: MeshConfig) -> str:
    return Workload(mesh.root_namespace, EXTAUTHZ_SERVICE_ACCOUNT).spiffe_id(mesh.trust_domain)


# HTTP filter names as they appear in the chain. Per-route configs (typed_per_filter_config) are
# keyed by these names, so every RBAC filter of a chain has its own (meshward.compile.authz.http_rbac).
FILTER_HEADER_MUTATION = "envoy.filters.http.header_mutation"
FILTER_RBAC = "envoy.filters.http.rbac"  # the extension's name; chain names are below
FILTER_EXTAUTHZ = "envoy.filters.http.ext_authz"  # the ext_authz filter after the RBAC filters
FILTER_EXTAUTHZ_TOKEN = "meshward.ext_authz.token"  # ext_authz first, for requests with a token
FILTER_ROUTER = "envoy.filters.http.router"
NETWORK_FILTER_RBAC = "envoy.filters.network.rbac"
# The RBAC filters of an inbound HTTP chain, in chain order. Every inbound HTTP chain has all of
# them, whatever the policy; their rules live in the route config (meshward.compile.authz.http_rbac).
RBAC_DRY_RUN_DENY = "meshward.rbac.dry_run_deny"
RBAC_DRY_RUN_ALLOW = "meshward.rbac.dry_run_allow"
RBAC_AUDIT = "meshward.rbac.audit"
RBAC_DENY = "meshward.rbac.deny"
RBAC_DENY_INDEXED = "meshward.rbac.deny_indexed"
RBAC_ALLOW_INDEXED = "meshward.rbac.allow_indexed"
RBAC_ALLOW = "meshward.rbac.allow"

# The dynamic-metadata namespace every HTTP RBAC filter writes into (whatever its chain name).
RBAC_METADATA_NAMESPACE = "envoy.filters.http.rbac"
NETWORK_RBAC_METADATA_NAMESPACE = "envoy.filters.network.rbac"

# Shadow stat prefixes. Envoy prefixes both the shadow stats and the shadow dynamic-metadata keys
# (``<prefix>shadow_engine_result``, ``<prefix>shadow_effective_policy_id``) with these, so the
# filters below never overwrite each other's results.
NATIVE_ALLOW_PREFIX = "meshward_native_allow_"  # native ALLOW rules when ext_authz may also allow
DRY_RUN_DENY_PREFIX = "meshward_dry_run_deny_"
DRY_RUN_ALLOW_PREFIX = "meshward_dry_run_allow_"
AUDIT_PREFIX = "meshward_audit_"
NATIVE_ALLOW_RESULT_KEY = NATIVE_ALLOW_PREFIX + "shadow_engine_result"
# Principal-indexed ALLOW rules evaluated first (meshward.compile.authz.principal_index), and the synthetic
# policy that carries their verdict into the rules engine.
INDEXED_ALLOW_PREFIX = "meshward_indexed_allow_"
INDEXED_ALLOW_RESULT_KEY = INDEXED_ALLOW_PREFIX + "shadow_engine_result"
INDEXED_ALLOW_POLICY = "meshward-indexed-allow"

# ext_authz CheckRequest.attributes.context_extensions keys (the ext_authz service reads them).
CONTEXT_WORKLOAD = "workload"  # "<ns>/<name>": whose policies to evaluate
CONTEXT_PORT = "port"  # the declared service port the request arrived on (runtime ports differ)

# The first route of every HTTP virtual host: a request whose Host (``:authority``) is not one
# host[:port] (two Host headers, which Envoy joins with ',') gets 400 before authorization.
ROUTE_INVALID_AUTHORITY = "meshward-invalid-authority"
# The second: a path with a "." or ".." segment carrying ";" parameters (``/x/%2e%2e;/admin``,
# which Envoy forwards as ``/x/..;/admin`` and Tomcat/Jetty/Spring serve as ``/admin``) gets 400
# before authorization.
ROUTE_DOT_SEGMENT_PARAMETERS = "meshward-dot-segment-parameters"

# Client-sent headers with this prefix are removed before any filter reads them, so only
# Meshward (ext_authz, the sidecar) can set them for the application.
MESHWARD_HEADER_PREFIX = "x-meshward-"


def rbac_policy_name(namespace: str, name: str, rule_index: int) -> str:
    """What a denial reports in ``rbac_access_denied_matched_policy[...]``; its string order is
    the order Envoy tries rules in (meshward.policy.ordering, shared with the evaluator)."""
    return rule_name(namespace, name, rule_index)


def workload_host(workload: Workload) -> str:
    """``<name>.<ns>``: the workload's part of cluster, listener and route names."""
    return f"{workload.name}.{workload.namespace}"


def inbound_listener(workload: Workload, port: int) -> str:
    return f"inbound|{port}|{workload_host(workload)}"


def inbound_cluster(workload: Workload, port: int) -> str:
    """The local application behind the sidecar, for one declared port."""
    return f"inbound|{port}||{workload_host(workload)}"


EXTAUTHZ_ROUTE_SUFFIX = "|extauthz"


def inbound_route(workload: Workload, port: int, *, extauthz: bool = False) -> str:
    """The inbound route config: the listener's name, plus ``|extauthz`` when the chain has the
    ext_authz filters.

    Every inbound HTTP chain has the same RBAC filters, so any rule edit is a new version of
    the same route config. The ext_authz filters are the one part of the chain a policy adds
    or removes (a workload that never needs the service has none), and a route config is only
    meaningful with the chain it was compiled for: the ALLOW union leaves the RBAC ALLOW filter
    in shadow mode and counts on ext_authz after it, so an old chain without ext_authz running
    the new rules would allow what it must not. When ext_authz appears or goes, the name
    changes with the listener: Envoy warms the new listener until the new route arrives, while
    connections on the old listener keep the old route until they drain (make-before-break).
    """
    base = inbound_listener(workload, port)
    return base + EXTAUTHZ_ROUTE_SUFFIX if extauthz else base


def outbound_listener(peer: Workload, port: int) -> str:
    return f"outbound|{port}||{workload_host(peer)}"


def outbound_cluster(peer: Workload, port: int) -> str:
    return f"outbound|{port}||{workload_host(peer)}"


def outbound_route(peer: Workload, port: int) -> str:
    return outbound_cluster(peer, port)


def peer_key(peer: Workload, port: int) -> str:
    """How bindings name one outbound target: ``<ns>/<name>:<port>``."""
    return f"{peer.ref}:{port}"


def stat_prefix(name: str) -> str:
    """Stat names treat '.' as a separator; keep each listener's stats one level deep."""
    return name.replace("|", "_").replace(".", "_").replace("/", "_").strip("_")
