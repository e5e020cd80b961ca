"""Inbound and outbound listeners, their route configs and clusters, as v3 JSON dicts.

Inbound (one listener per declared port): mTLS per PeerAuthentication (STRICT: TLS only;
PERMISSIVE: TLS and plaintext chains chosen by the TLS inspector; DISABLE: plaintext), then for
HTTP the connection manager with path normalization as the evaluator assumes, client-sent
``x-meshward-*`` headers removed, the authorization filters and the router to the local
application, with the authorization rules in the route config (RDS in xDS mode, so a policy
edit reaches open connections). The first route of every HTTP virtual host (inbound and
outbound) answers 400 to a request whose Host is not one host[:port], such as two Host
headers joined by Envoy; inbound it does so with the authorization filters off, before any
rule, as the evaluator says (meshward.policy.paths.check_authority). For TCP the network RBAC filters and a TCP proxy (network RBAC
has no per-route config: a TCP policy edit replaces the listener, and a connection is
authorized once, when it opens).

Outbound (one listener per peer port the workload may call): plaintext from the application on a
local port, upstream mTLS with the workload's SVID to the peer, SNI and SAN check on the peer's
SPIFFE ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshward.compile import authz, names, observe, tls
from meshward.compile.options import CompileOptions, Endpoint, Mode
from meshward.policy.model import MtlsMode, Protocol, Workload, WorkloadPort
from meshward.policy.paths import AUTHORITY_REGEX, DOT_SEGMENT_PARAMETERS_REGEX

Json = dict[str, Any]

T_HCM = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
T_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
T_HEADER_MUTATION = (
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
)
T_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
T_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ADS: Json = {"ads": {}, "resource_api_version": "V3"}


def socket_address(endpoint: Endpoint) -> Json:
    return {"socket_address": {"address": endpoint.host, "port_value": endpoint.port}}


def is_http(port: WorkloadPort) -> bool:
    return port.protocol is not Protocol.TCP


def is_h2(port: WorkloadPort) -> bool:
    return port.protocol in (Protocol.HTTP2, Protocol.GRPC)


def _http2_options() -> Json:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": T_HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _duration_ms(ms: int) -> str:
    return f"{ms / 1000:g}s"


@dataclass(frozen=True)
class Built:
    """Resources for one listener: the listener, its route config (xDS mode), its clusters and
    their endpoints (xDS mode)."""

    listener: Json
    route: Json | None
    clusters: tuple[Json, ...]
    endpoints: tuple[Json, ...]


# ---- clusters ------------------------------------------------------------------------------


def load_assignment(name: str, endpoints: list[Endpoint]) -> Json:
    return {
        "cluster_name": name,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": socket_address(e)}} for e in endpoints]}
        ],
    }


def static_cluster(
    name: str, endpoint: Endpoint, options: CompileOptions, *, h2: bool = False
) -> Json:
    cluster: Json = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": _duration_ms(options.connect_timeout_ms),
        "load_assignment": load_assignment(name, [endpoint]),
    }
    if h2:
        cluster["typed_extension_protocol_options"] = _http2_options()
    return cluster


def grpc_cluster(name: str, endpoint: Endpoint, options: CompileOptions) -> Json:
    """ext_authz and OTLP: gRPC needs explicit HTTP/2 or Envoy speaks HTTP/1.1 (DESIGN.md)."""
    return static_cluster(name, endpoint, options, h2=True)


# ---- inbound -------------------------------------------------------------------------------


def _strip_meshward_headers() -> Json:
    return {
        "name": names.FILTER_HEADER_MUTATION,
        "typed_config": {
            "@type": T_HEADER_MUTATION,
            "mutations": {
                "request_mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": names.MESHWARD_HEADER_PREFIX}}}
                ]
            },
        },
    }


INVALID_AUTHORITY_BODY = (
    "meshward: bad request: the Host header must name exactly one host[:port] "
    "(RFC 9112 3.2: a request with several Host headers is invalid)\n"
)


def invalid_authority_route(off: Json | None = None) -> Json:
    """The first route of every HTTP virtual host: 400 for a request whose ``:authority`` is
    not one host[:port] (meshward.policy.paths.AUTHORITY_REGEX, which the evaluator applies
    too). Envoy 1.40 joins two Host lines into one authority (``payments.shop,admin.internal``)
    instead of rejecting the request: a host rule would not match it and the application
    would see both names. ``off``: per-filter configs switching the authorization filters off,
    so the answer is 400 whatever the policy (it is decided before authorization)."""
    route: Json = {
        "name": names.ROUTE_INVALID_AUTHORITY,
        "match": {
            "prefix": "/",
            "headers": [
                {
                    "name": ":authority",
                    "string_match": {"safe_regex": {"regex": AUTHORITY_REGEX}},
                    "invert_match": True,
                }
            ],
        },
        "direct_response": {"status": 400, "body": {"inline_string": INVALID_AUTHORITY_BODY}},
    }
    if off:
        route["typed_per_filter_config"] = off
    return route


DOT_SEGMENT_PARAMETERS_BODY = (
    "meshward: bad request: a '.' or '..' path segment with ';' parameters (such as "
    "/x/%2e%2e;/admin or /x/..%3b/admin) is refused: the application would read it as a dot "
    "segment\n"
)


def dot_segment_parameters_route(off: Json | None = None) -> Json:
    """The second route of every HTTP virtual host: 400 for a request whose (normalized) path
    has a ``.;``/``..;`` segment, ``;`` raw or escaped as ``%3B``
    (meshward.policy.paths.DOT_SEGMENT_PARAMETERS_REGEX, which the evaluator applies too).
    Envoy strips ``;`` parameters only after LITERAL dot segments, so ``/x/%2e%2e;/admin`` would
    pass a DENY on /admin and reach a Tomcat/Jetty/Spring application as /admin. The regex sees ``:path`` with its query and is anchored to the path part. ``off``:
    per-filter configs switching the authorization filters off (decided before authorization)."""
    route: Json = {
        "name": names.ROUTE_DOT_SEGMENT_PARAMETERS,
        "match": {
            "prefix": "/",
            "headers": [
                {
                    "name": ":path",
                    "string_match": {"safe_regex": {"regex": DOT_SEGMENT_PARAMETERS_REGEX}},
                }
            ],
        },
        "direct_response": {
            "status": 400,
            "body": {"inline_string": DOT_SEGMENT_PARAMETERS_BODY},
        },
    }
    if off:
        route["typed_per_filter_config"] = off
    return route


def _router() -> Json:
    return {"name": names.FILTER_ROUTER, "typed_config": {"@type": T_ROUTER}}


def _filter_chains(
    filters: list[Json], mode: MtlsMode, tls_socket: Json, plain_filters: list[Json] | None = None
) -> tuple[list[Json], list[Json]]:
    """(filter_chains, listener_filters) for an mTLS mode; ``plain_filters`` (default: the same
    as ``filters``) serve the plaintext chain.

    The TLS inspector runs whenever TLS is possible: it tells TLS from plaintext (PERMISSIVE) and
    it is what makes the SNI visible to RBAC (``connection.sni``) and the access log.
    """
    plain_filters = filters if plain_filters is None else plain_filters
    if mode is MtlsMode.DISABLE:
        return [{"name": "plaintext", "filters": plain_filters}], []
    inspector = {
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": T_TLS_INSPECTOR},
    }
    secure = {"name": "mtls", "filters": filters, "transport_socket": tls_socket}
    if mode is MtlsMode.STRICT:
        return [secure], [inspector]
    secure["filter_chain_match"] = {"transport_protocol": "tls"}
    plain = {
        "name": "plaintext",
        "filter_chain_match": {"transport_protocol": "raw_buffer"},
        "filters": plain_filters,
    }
    return [secure, plain], [inspector]


def _listener(
    name: str,
    bind: Endpoint,
    chains: list[Json],
    listener_filters: list[Json],
    direction: str,
) -> Json:
    listener: Json = {
        "name": name,
        "address": socket_address(bind),
        "traffic_direction": direction,
        "filter_chains": chains,
    }
    if listener_filters:
        listener["listener_filters"] = listener_filters
    return listener


def _connection_log(
    listener: Json, options: CompileOptions, workload: Workload, port: WorkloadPort
) -> None:
    log = observe.connection_flow_log(options, workload=workload.ref, port=port.port)
    if log:
        listener["access_log"] = log


def _hcm(
    *,
    stat: str,
    route_name: str,
    route_config: Json,
    http_filters: list[Json],
    options: CompileOptions,
    access_log: list[Json],
    service_name: str,
    inbound: bool,
) -> Json:
    hcm: Json = {
        "@type": T_HCM,
        "stat_prefix": stat,
        "codec_type": "AUTO",
        # ``admin.internal.`` is ``admin.internal`` to DNS: host rules and the application see
        # it without the dot (the evaluator strips it the same way, meshward.policy.paths).
        "strip_trailing_host_dot": True,
    }
    if options.mode is Mode.XDS:
        hcm["rds"] = {"config_source": ADS, "route_config_name": route_name}
    else:
        hcm["route_config"] = route_config
    if inbound:
        hcm.update(
            {
                # The evaluator normalizes paths exactly like this (meshward.policy.paths).
                "normalize_path": True,
                "merge_slashes": True,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                # The application gets a trustworthy XFCC naming the verified peer only.
                "forward_client_cert_details": "SANITIZE_SET",
                "set_current_client_cert_details": {"uri": True},
                # remote.ip / remoteIpBlocks: the last X-Forwarded-For hop, else the peer address.
                "use_remote_address": False,
            }
        )
    hcm["http_filters"] = http_filters
    if access_log:
        hcm["access_log"] = access_log
    tracing = observe.tracing(options, service_name)
    if tracing is not None:
        hcm["tracing"] = tracing
    return hcm


def inbound_http(
    workload: Workload,
    port: WorkloadPort,
    *,
    placement: authz.AuthzPlacement,
    port_map: dict[int, int],
    mode: MtlsMode,
    options: CompileOptions,
    trust_domain: str,
) -> Built:
    """The listener holds the authorization filters (the same for every policy but ext_authz),
    the route config their rules (meshward.compile.authz.builder): a policy edit changes only the
    route, unless it adds or removes the workload's need for ext_authz."""
    binding = options.port_binding(workload, port.port)
    listener_name = names.inbound_listener(workload, port.port)
    cluster_name = names.inbound_cluster(workload, port.port)
    access = authz.build_http(
        placement,
        port_map,
        workload_ref=workload.ref,
        declared_port=port.port,
        extauthz_timeout_ms=options.extauthz_timeout_ms,
        index_min_rules=options.rbac_index_min_rules,
        jwks=options.jwks,
        trust_domain=trust_domain,
    )
    route_name = names.inbound_route(workload, port.port, extauthz=access.extauthz)
    action = {"cluster": cluster_name, "timeout": "0s"}
    off = access.off_config()
    routes = [invalid_authority_route(off), dot_segment_parameters_route(off)]
    routes += [{**r, "route": action} for r in access.token_routes]
    routes.append({"name": "default", "match": {"prefix": "/"}, "route": action})
    vhost: Json = {"name": "inbound", "domains": ["*"], "routes": routes}
    per_filter = access.vhost_config()
    if per_filter:
        vhost["typed_per_filter_config"] = per_filter
    route_config = {"name": route_name, "virtual_hosts": [vhost]}

    def connection_manager(peer: bool) -> list[Json]:
        http_filters = [_strip_meshward_headers(), *access.filters(peer=peer), _router()]
        hcm = _hcm(
            stat=names.stat_prefix(f"inbound_{port.port}"),
            route_name=route_name,
            route_config=route_config,
            http_filters=http_filters,
            options=options,
            access_log=observe.access_log(
                options, workload=workload.ref, direction="inbound", port=port.port
            ),
            service_name=names.workload_host(workload),
            inbound=True,
        )
        return [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]

    # The principal index needs a peer certificate: plaintext chains leave those filters out.
    chains, listener_filters = _filter_chains(
        connection_manager(peer=True),
        mode,
        tls.downstream_tls(options.mode, trust_domain, alpn=tls.ALPN_HTTP),
        connection_manager(peer=False),
    )
    listener = _listener(listener_name, binding.listen, chains, listener_filters, "INBOUND")
    _connection_log(listener, options, workload, port)
    return Built(
        listener=listener,
        route=route_config if options.mode is Mode.XDS else None,
        clusters=(static_cluster(cluster_name, binding.app, options, h2=is_h2(port)),),
        endpoints=(),
    )


def inbound_tcp(
    workload: Workload,
    port: WorkloadPort,
    *,
    placement: authz.AuthzPlacement,
    port_map: dict[int, int],
    mode: MtlsMode,
    options: CompileOptions,
    trust_domain: str,
) -> Built:
    binding = options.port_binding(workload, port.port)
    listener_name = names.inbound_listener(workload, port.port)
    cluster_name = names.inbound_cluster(workload, port.port)
    stat = names.stat_prefix(f"inbound_{port.port}")
    proxy: Json = {"@type": T_TCP_PROXY, "stat_prefix": stat, "cluster": cluster_name}
    log = observe.access_log(
        options, workload=workload.ref, direction="inbound", port=port.port, tcp=True
    )
    if log:
        proxy["access_log"] = log
    filters = [
        *authz.build_tcp(placement, port_map, stat),
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy},
    ]
    chains, listener_filters = _filter_chains(
        filters, mode, tls.downstream_tls(options.mode, trust_domain, alpn=None)
    )
    listener = _listener(listener_name, binding.listen, chains, listener_filters, "INBOUND")
    _connection_log(listener, options, workload, port)
    return Built(
        listener=listener,
        route=None,
        clusters=(static_cluster(cluster_name, binding.app, options),),
        endpoints=(),
    )


# ---- outbound ------------------------------------------------------------------------------


def outbound(
    workload: Workload,
    peer: Workload,
    port: WorkloadPort,
    *,
    bind: Endpoint,
    peer_mode: MtlsMode,
    options: CompileOptions,
    trust_domain: str,
) -> Built:
    name = names.outbound_cluster(peer, port.port)
    listener_name = names.outbound_listener(peer, port.port)
    target = options.port_binding(peer, port.port).reachable
    cluster: Json = {"name": name, "connect_timeout": _duration_ms(options.connect_timeout_ms)}
    endpoints: tuple[Json, ...] = ()
    if options.mode is Mode.XDS:
        cluster["type"] = "EDS"
        cluster["eds_cluster_config"] = {"eds_config": ADS, "service_name": name}
        endpoints = (load_assignment(name, [target]),)
    else:
        cluster["type"] = "STATIC"
        cluster["load_assignment"] = load_assignment(name, [target])
    if is_h2(port):
        cluster["typed_extension_protocol_options"] = _http2_options()
    if peer_mode is not MtlsMode.DISABLE:
        alpn = (["h2"] if is_h2(port) else ["http/1.1"]) if is_http(port) else None
        cluster["transport_socket"] = tls.upstream_tls(
            options.mode, peer.spiffe_id(trust_domain), alpn=alpn
        )
    stat = names.stat_prefix(f"outbound_{port.port}_{names.workload_host(peer)}")
    log = observe.access_log(
        options, workload=workload.ref, direction="outbound", tcp=not is_http(port)
    )
    route: Json | None = None
    if is_http(port):
        route = {
            "name": names.outbound_route(peer, port.port),
            "virtual_hosts": [
                {
                    "name": "outbound",
                    "domains": ["*"],
                    "routes": [
                        invalid_authority_route(),
                        dot_segment_parameters_route(),
                        {
                            "name": "default",
                            "match": {"prefix": "/"},
                            "route": {"cluster": name, "timeout": "0s"},
                        },
                    ],
                }
            ],
        }
        hcm = _hcm(
            stat=stat,
            route_name=route["name"],
            route_config=route,
            http_filters=[_router()],
            options=options,
            access_log=log,
            service_name=names.workload_host(workload),
            inbound=False,
        )
        filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    else:
        proxy: Json = {"@type": T_TCP_PROXY, "stat_prefix": stat, "cluster": name}
        if log:
            proxy["access_log"] = log
        filters = [{"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy}]
    listener = _listener(listener_name, bind, [{"filters": filters}], [], "OUTBOUND")
    return Built(
        listener=listener,
        route=route if options.mode is Mode.XDS else None,
        clusters=(cluster,),
        endpoints=endpoints,
    )
