"""The compiled resources' shape: what each workload gets, and what it must not get."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from meshward.compile import (
    CompileOptions,
    Endpoint,
    Mode,
    PortBinding,
    WorkloadBinding,
    compile_mesh,
    compile_workload,
)
from meshward.compile.workload import to_dict
from meshward.errors import UserError
from meshward.policy import PolicySet
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    JwtEnforcement,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Protocol,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.testing import synth

TD = "cluster.local"
WEB = f"{TD}/ns/shop/sa/web"
EXTAUTHZ = Endpoint("127.0.0.1", 9191)


def workload(name: str, *ports: WorkloadPort, ns: str = "shop") -> Workload:
    return Workload(
        namespace=ns, name=name, labels={"app": name}, service_account=name, ports=ports
    )


HTTP = WorkloadPort("http", 8080)


def policy_set(
    *policies: AuthorizationPolicy,
    workloads: tuple[Workload, ...] | None = None,
    mode: MtlsMode = MtlsMode.STRICT,
    port_level: dict[int, MtlsMode] | None = None,
    jwt: JwtEnforcement = JwtEnforcement.EXTAUTHZ,
) -> PolicySet:
    """``jwt``: these tests pin the ext_authz JWT path (MeshConfig jwtEnforcement: extauthz);
    the native path (jwt_authn + RBAC) has its own tests in test_jwt_authn.py."""
    peers = [PeerAuthentication(namespace="shop", name="default", mode=mode)]
    if port_level:
        peers.append(
            PeerAuthentication(
                namespace="shop", name="api-ports", selector={"app": "api"}, port_level=port_level
            )
        )
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TD, jwt_enforcement=jwt),
        workloads=workloads or (workload("api", HTTP), workload("web", HTTP)),
        authorization_policies=policies,
        peer_authentications=peers,
    )


def allow(name: str, *rules: Rule, action: Action = Action.ALLOW, **kw: Any) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace="shop", name=name, action=action, selector={"app": "api"}, rules=rules, **kw
    )


def listener(resources: Any, name: str) -> dict[str, Any]:
    for item in resources.listeners:
        if item.name == name:
            return to_dict(item)
    raise KeyError(name)


def http_filters(resources: Any, port: int = 8080) -> list[dict[str, Any]]:
    found = listener(resources, f"inbound|{port}|api.shop")
    hcm = found["filter_chains"][0]["filters"][0]["typed_config"]
    return list(hcm["http_filters"])


def route_config(resources: Any, port: int = 8080) -> dict[str, Any]:
    """The inbound route config: inline (static mode) or the RDS resource it names (xDS)."""
    hcm = listener(resources, f"inbound|{port}|api.shop")["filter_chains"][0]["filters"][0]
    typed = hcm["typed_config"]
    if "route_config" in typed:
        return dict(typed["route_config"])
    name = typed["rds"]["route_config_name"]
    return next(to_dict(r) for r in resources.routes if r.name == name)


def per_route(resources: Any, filter_name: str, port: int = 8080) -> dict[str, Any]:
    """The virtual host's typed_per_filter_config for one filter of the chain."""
    vhost = route_config(resources, port)["virtual_hosts"][0]
    return dict(vhost["typed_per_filter_config"][filter_name])


def rbac_rules(resources: Any, filter_name: str = "meshward.rbac.allow") -> dict[str, Any]:
    """The RBAC message (rules, shadow rules, matcher) one RBAC filter gets from the route."""
    return dict(per_route(resources, filter_name)["rbac"])


RBAC_CHAIN = [
    "meshward.rbac.dry_run_deny",
    "meshward.rbac.dry_run_allow",
    "meshward.rbac.audit",
    "meshward.rbac.deny",
    "meshward.rbac.deny_indexed",
    "meshward.rbac.allow_indexed",
    "meshward.rbac.allow",
]


def filter_names(resources: Any) -> list[str]:
    """The chain as the default route runs it: RBAC filters with rules (the others have no
    route config and pass every request), ext_authz filters marked ``:off`` where disabled."""
    out = []
    vhost = route_config(resources)["virtual_hosts"][0].get("typed_per_filter_config", {})
    for f in http_filters(resources):
        config = f["typed_config"]
        if config["@type"].endswith("rbac.v3.RBAC"):
            if f["name"] not in vhost:
                continue
            rbac = rbac_rules(resources, f["name"])
            kind = "rbac:" + ("enforce" if "rules" in rbac or "matcher" in rbac else "shadow")
            engine = rbac.get("rules") or rbac.get("shadow_rules") or {}
            out.append(kind + ":" + engine.get("action", "ALLOW"))
        else:
            off = vhost.get(f["name"], {}).get("disabled", False)
            out.append(f["name"].rsplit(".", 1)[-1] + (":off" if off else ""))
    return out


NATIVE_RULE = Rule(sources=(Source(principals=(WEB,)),), operations=(Operation(methods=("GET",)),))
JWT_RULE = Rule(sources=(Source(request_principals=("https://idp/*",)),))


def test_native_only_workload_has_no_extauthz_filter_and_no_extauthz_cluster() -> None:
    ps = policy_set(allow("a", NATIVE_RULE), allow("d", NATIVE_RULE, action=Action.DENY))
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    assert filter_names(resources) == [
        "header_mutation",
        "rbac:enforce:DENY",
        "rbac:enforce:ALLOW",
        "router",
    ]
    chain = [f["name"] for f in http_filters(resources)]
    assert chain == ["envoy.filters.http.header_mutation", *RBAC_CHAIN, "envoy.filters.http.router"]
    assert "meshward-extauthz" not in {c.name for c in resources.clusters}
    assert not resources.extauthz


def test_no_policy_means_every_rbac_filter_passes() -> None:
    """The RBAC filters are there (so the first policy is a route change), with no engine in
    the listener and no route config: they pass every request."""
    resources = compile_workload(policy_set(), "shop/api")
    assert filter_names(resources) == ["header_mutation", "router"]
    assert [f["name"] for f in http_filters(resources)][1:-1] == RBAC_CHAIN
    assert "typed_per_filter_config" not in route_config(resources)["virtual_hosts"][0]


def test_allow_nothing_policy_is_an_empty_enforced_allow() -> None:
    resources = compile_workload(policy_set(allow("nothing")), "shop/api")
    assert rbac_rules(resources)["rules"] == {}  # ALLOW, no policies: every request denied


def test_a_dry_run_allow_nothing_reports_every_request_as_would_deny() -> None:
    """Without its (ruleless) shadow ALLOW engine, a dry-run allow-nothing (what `policy
    suggest` writes for a workload nobody called) would report nothing, and enforcing it would
    deny traffic the dry run never showed."""
    from meshward.testing import simulate

    api = workload("api", HTTP, WorkloadPort("db", 5432, Protocol.TCP))
    ps = policy_set(allow("nothing", dry_run=True), workloads=(api, workload("web", HTTP)),
                    mode=MtlsMode.PERMISSIVE)  # fmt: skip
    resources = compile_workload(ps, "shop/api", CompileOptions(mode=Mode.STATIC))
    rules = rbac_rules(resources, "meshward.rbac.dry_run_allow")
    assert rules["shadow_rules"].get("policies", {}) == {} and "rules" not in rules
    outcome = simulate.run(
        listener(resources, "inbound|8080|api.shop"),
        simulate.Connection(
            method="GET", path="/", host="api", headers={}, port=8080, peer_uri=None
        ),
    )
    assert outcome.status == 200  # dry-run: nothing enforced
    assert outcome.metadata["meshward_dry_run_allow_shadow_engine_result"] == "denied"
    tcp = listener(resources, "inbound|5432|api.shop")["filter_chains"][0]["filters"]
    [shadow] = [f["typed_config"] for f in tcp if f["name"] == "envoy.filters.network.rbac"]
    assert shadow["shadow_rules_stat_prefix"] == "meshward_dry_run_allow_"
    assert shadow["shadow_rules"].get("policies", {}) == {} and "rules" not in shadow


def test_allow_union_runs_native_allow_as_shadow_and_gates_extauthz() -> None:
    ps = policy_set(allow("native", NATIVE_RULE), allow("jwt", JWT_RULE))
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    assert filter_names(resources) == [
        "header_mutation",
        "token:off",  # no RequestAuthentication: no token route enables it
        "rbac:shadow:ALLOW",
        "ext_authz",
        "router",
    ]
    by_name = {f["name"]: f for f in http_filters(resources)}
    shadow, extauthz = by_name["meshward.rbac.allow"], by_name["envoy.filters.http.ext_authz"]
    assert shadow["typed_config"]["shadow_rules_stat_prefix"] == "meshward_native_allow_"
    rules = rbac_rules(resources)
    assert rules["shadow_rules_stat_prefix"] == "meshward_native_allow_"  # metadata keys
    assert list(rules["shadow_rules"]["policies"]) == ["ns[shop]-policy[native]-rule[0]"]
    config = extauthz["typed_config"]
    assert config["filter_enabled_metadata"] == {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "meshward_native_allow_shadow_engine_result"}],
        "value": {"string_match": {"exact": "allowed"}},
        "invert": True,
    }
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == "meshward-extauthz"
    assert config["include_peer_certificate"] is True
    assert config["transport_api_version"] == "V3"
    assert config.get("failure_mode_allow", False) is False
    assert "meshward-extauthz" in {c.name for c in resources.clusters}


@pytest.mark.parametrize(
    "extra",
    [
        allow("custom", Rule(), action=Action.CUSTOM, provider="opa"),
        allow("jwt-deny", JWT_RULE, action=Action.DENY),
    ],
    ids=["custom", "jwt-deny"],
)
def test_custom_and_jwt_deny_need_extauthz_on_every_request(extra: AuthorizationPolicy) -> None:
    """The late ext_authz filter is the same (gated) in every chain; here the route gives the
    ALLOW filter no shadow rules, so no verdict ever skips ext_authz: it decides every
    request, whole policy included."""
    ps = policy_set(allow("native", NATIVE_RULE), allow("jwt", JWT_RULE), extra)
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    assert resources.placement.extauthz_always
    assert filter_names(resources) == ["header_mutation", "token:off", "ext_authz", "router"]
    assert "meshward_native_allow_" not in json.dumps(route_config(resources))
    union = compile_workload(
        policy_set(allow("native", NATIVE_RULE), allow("jwt", JWT_RULE)),
        "shop/api",
        CompileOptions(extauthz=EXTAUTHZ),
    )
    assert http_filters(resources) == http_filters(union)  # the listener did not change


def test_extauthz_route_names_the_workload_and_declared_port() -> None:
    api = workload("api", HTTP, WorkloadPort("grpc", 9090, Protocol.GRPC))
    ps = policy_set(allow("jwt", JWT_RULE), workloads=(api, workload("web", HTTP)))
    options = CompileOptions(mode=Mode.STATIC, extauthz=EXTAUTHZ)
    resources = compile_workload(ps, "shop/api", options)
    for port in (8080, 9090):
        config = per_route(resources, "envoy.filters.http.ext_authz", port)
        assert config["check_settings"]["context_extensions"] == {
            "workload": "shop/api",
            "port": str(port),
        }


def test_missing_extauthz_address_is_a_user_error() -> None:
    with pytest.raises(UserError, match="needs the ext_authz service"):
        compile_workload(policy_set(allow("jwt", JWT_RULE)), "shop/api")


def test_ports_are_translated_to_runtime_ports() -> None:
    rule = Rule(
        operations=(Operation(ports=(8080, 1234)),),
        conditions=(Condition(key="destination.port", not_values=("8080",)),),
    )
    binding = WorkloadBinding(
        ports={
            8080: PortBinding(listen=Endpoint("127.0.0.1", 31000), app=Endpoint("127.0.0.1", 31001))
        }
    )
    options = CompileOptions(bindings={"shop/api": binding})
    resources = compile_workload(policy_set(allow("p", rule)), "shop/api", options)
    found = listener(resources, "inbound|8080|api.shop")
    assert found["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 31000}
    permission = rbac_rules(resources)["rules"]["policies"]["ns[shop]-policy[p]-rule[0]"][
        "permissions"
    ][0]
    assert permission == {
        "and_rules": {
            "rules": [
                {
                    "or_rules": {
                        "rules": [
                            {"destination_port": 31000},
                            {"not_rule": {"any": True}},  # 1234 is not a port of shop/api
                        ]
                    }
                },
                {"not_rule": {"destination_port": 31000}},
            ]
        }
    }
    app = next(c for c in resources.clusters if c.name == "inbound|8080||api.shop")
    assert (
        app.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value
        == 31001
    )


def test_identity_bindings_translate_nothing() -> None:
    rule = Rule(operations=(Operation(ports=(8080,)),))
    resources = compile_workload(policy_set(allow("p", rule)), "shop/api")
    found = listener(resources, "inbound|8080|api.shop")
    assert found["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 8080}
    policies = rbac_rules(resources)["rules"]["policies"]
    assert policies["ns[shop]-policy[p]-rule[0]"]["permissions"] == [{"destination_port": 8080}]


@pytest.mark.parametrize(
    ("mode", "chains", "inspector"),
    [
        (MtlsMode.STRICT, ["mtls"], True),
        (MtlsMode.PERMISSIVE, ["mtls", "plaintext"], True),
        (MtlsMode.DISABLE, ["plaintext"], False),
    ],
)
def test_mtls_modes(mode: MtlsMode, chains: list[str], inspector: bool) -> None:
    resources = compile_workload(policy_set(mode=mode), "shop/api")
    found = listener(resources, "inbound|8080|api.shop")
    assert [c["name"] for c in found["filter_chains"]] == chains
    assert bool(found.get("listener_filters")) is inspector
    for chain in found["filter_chains"]:
        if chain["name"] == "mtls":
            tls = chain["transport_socket"]["typed_config"]
            assert tls["require_client_certificate"] is True
            common = tls["common_tls_context"]
            assert common["tls_certificate_sds_secret_configs"][0]["name"] == "default"
            combined = common["combined_validation_context"]
            assert combined["validation_context_sds_secret_config"]["name"] == "ROOTCA"
            assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
                {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
            ]
        else:
            assert "transport_socket" not in chain
    if mode is MtlsMode.PERMISSIVE:
        matches = [c["filter_chain_match"]["transport_protocol"] for c in found["filter_chains"]]
        assert matches == ["tls", "raw_buffer"]


def test_port_level_mtls_overrides_the_namespace() -> None:
    api = workload("api", HTTP, WorkloadPort("metrics", 9100))
    ps = policy_set(workloads=(api, workload("web", HTTP)), port_level={9100: MtlsMode.DISABLE})
    resources = compile_workload(ps, "shop/api")
    assert [c["name"] for c in listener(resources, "inbound|8080|api.shop")["filter_chains"]] == [
        "mtls"
    ]
    assert [c["name"] for c in listener(resources, "inbound|9100|api.shop")["filter_chains"]] == [
        "plaintext"
    ]


def test_inbound_hcm_normalizes_paths_sanitizes_xfcc_and_logs_json() -> None:
    options = CompileOptions(access_log_path="/tmp/access.log", otlp=Endpoint("127.0.0.1", 4317))
    resources = compile_workload(policy_set(), "shop/api", options)
    hcm = listener(resources, "inbound|8080|api.shop")["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    assert hcm["normalize_path"] is True
    assert hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["forward_client_cert_details"] == "SANITIZE_SET"
    assert hcm["set_current_client_cert_details"] == {"uri": True}
    assert hcm["rds"]["route_config_name"] == "inbound|8080|api.shop"  # xDS mode: RDS
    strip = hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    assert strip == [{"remove_on_match": {"key_matcher": {"prefix": "x-meshward-"}}}]
    log = hcm["access_log"][0]["typed_config"]
    fields = log["log_format"]["json_format"]
    assert log["path"] == "/tmp/access.log"
    assert fields["response_code_details"] == "%RESPONSE_CODE_DETAILS%"
    assert fields["rbac"] == "%DYNAMIC_METADATA(envoy.filters.http.rbac)%"
    assert fields["trace_id"] == "%TRACE_ID%"
    assert fields["peer_principal"] == "%DOWNSTREAM_PEER_URI_SAN%"
    assert fields["workload"] == "shop/api"
    provider = hcm["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "meshward-otlp"
    otlp = next(c for c in resources.clusters if c.name == "meshward-otlp")
    assert otlp.typed_extension_protocol_options  # gRPC: explicit HTTP/2


def test_outbound_cluster_uses_own_svid_and_checks_the_peer_identity() -> None:
    resources = compile_workload(policy_set(), "shop/web")
    cluster = to_dict(next(c for c in resources.clusters if c.name == "outbound|8080||api.shop"))
    assert cluster["type"] == "EDS"
    tls = cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "spiffe://cluster.local/ns/shop/sa/api"
    common = tls["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"] == [
        {"name": "default", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
    ]
    combined = common["combined_validation_context"]
    assert combined["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/shop/sa/api"}}
    ]
    assert [e.cluster_name for e in resources.endpoints] == ["outbound|8080||api.shop"]
    outbound = listener(resources, "outbound|8080||api.shop")
    assert outbound["address"]["socket_address"]["address"] == "127.0.0.1"
    assert resources.secret_names == ("ROOTCA", "default")


def test_static_mode_inlines_routes_endpoints_and_bare_secret_names() -> None:
    resources = compile_workload(policy_set(), "shop/web", CompileOptions(mode=Mode.STATIC))
    assert resources.routes == () and resources.endpoints == ()
    cluster = to_dict(next(c for c in resources.clusters if c.name == "outbound|8080||api.shop"))
    assert cluster["type"] == "STATIC" and cluster["load_assignment"]
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["tls_certificate_sds_secret_configs"] == [{"name": "default"}]


def test_outbound_to_a_disabled_peer_is_plaintext() -> None:
    resources = compile_workload(policy_set(mode=MtlsMode.DISABLE), "shop/web")
    cluster = next(c for c in resources.clusters if c.name == "outbound|8080||api.shop")
    assert not cluster.HasField("transport_socket")
    assert resources.secret_names == ()


def test_peers_are_pruned_by_the_peer_allow_policies() -> None:
    others = (
        workload("api", HTTP),
        workload("web", HTTP),
        workload("batch", HTTP),
        workload("db", HTTP),
    )
    web_only = AuthorizationPolicy(
        namespace="shop",
        name="db-from-web",
        selector={"app": "db"},
        rules=(Rule(sources=(Source(principals=(WEB,)),)),),
    )
    ps = policy_set(web_only, workloads=others)
    names_for = {
        ref: sorted(c.name for c in r.clusters if c.name.startswith("outbound"))
        for ref, r in compile_mesh(ps).items()
    }
    assert "outbound|8080||db.shop" in names_for["shop/web"]
    assert "outbound|8080||db.shop" not in names_for["shop/batch"]
    assert "outbound|8080||api.shop" in names_for["shop/batch"]  # api has no ALLOW: open
    assert all("||web.shop" not in n for n in names_for["shop/web"])  # never itself


def test_expired_emergency_policy_is_dropped_and_next_change_reported() -> None:
    from datetime import UTC, datetime

    expires = datetime(2030, 1, 1, tzinfo=UTC)
    ps = policy_set(allow("emergency", NATIVE_RULE, expires_at=expires), allow("base", NATIVE_RULE))
    before = compile_workload(ps, "shop/api", now=datetime(2029, 1, 1, tzinfo=UTC))
    after = compile_workload(ps, "shop/api", now=datetime(2031, 1, 1, tzinfo=UTC))
    assert before.next_change == expires
    assert after.next_change is None
    names_before = rbac_rules(before)["rules"]["policies"]
    names_after = rbac_rules(after)["rules"]["policies"]
    assert "ns[shop]-policy[emergency]-rule[0]" in names_before
    assert "ns[shop]-policy[emergency]-rule[0]" not in names_after


def test_tcp_port_gets_network_rbac_and_no_http_filters() -> None:
    api = workload("api", WorkloadPort("db", 5432, Protocol.TCP))
    deny_paths = allow(
        "deny",
        Rule(sources=(Source(principals=(WEB,)),), operations=(Operation(paths=("/x",)),)),
        action=Action.DENY,
    )
    allow_methods = allow("allow", Rule(operations=(Operation(methods=("GET",)),)))
    ps = policy_set(deny_paths, allow_methods, workloads=(api, workload("web", HTTP)))
    resources = compile_workload(ps, "shop/api")
    chain = listener(resources, "inbound|5432|api.shop")["filter_chains"][0]
    kinds = [f["name"] for f in chain["filters"]]
    assert kinds == [
        "envoy.filters.network.rbac",
        "envoy.filters.network.rbac",
        "envoy.filters.network.tcp_proxy",
    ]
    deny, allow_ = (f["typed_config"] for f in chain["filters"][:2])
    # DENY keeps its TCP fields (the path is dropped: denies more); ALLOW needing HTTP: nothing.
    assert deny["rules"]["policies"]["ns[shop]-policy[deny]-rule[0]"]["permissions"] == [
        {"any": True}
    ]
    assert allow_["rules"].get("policies", {}) == {}


def test_workload_can_be_given_by_ref_and_unknown_ref_is_a_user_error() -> None:
    ps = policy_set()
    assert compile_workload(ps, "shop/api").workload == "shop/api"
    with pytest.raises(UserError, match="no workload"):
        compile_workload(ps, "shop/nope")


def test_partial_bindings_are_refused() -> None:
    api = workload("api", HTTP, WorkloadPort("b", 9090))
    binding = WorkloadBinding(
        ports={8080: PortBinding(listen=Endpoint("127.0.0.1", 1), app=Endpoint("127.0.0.1", 2))}
    )
    ps = policy_set(workloads=(api, workload("web", HTTP)))
    with pytest.raises(UserError, match="do not cover"):
        compile_workload(ps, "shop/api", CompileOptions(bindings={"shop/api": binding}))


def test_runtime_bindings_give_every_port_and_peer_its_own_port() -> None:
    from meshward.compile import runtime_bindings

    ps = synth.random_policy_set(1)
    supply = iter(range(20000, 21000))
    bindings = runtime_bindings(ps.workloads, supply)
    used = [b.listen.port for wb in bindings.values() for b in wb.ports.values()]
    used += [b.app.port for wb in bindings.values() for b in wb.ports.values()]
    used += [e.port for wb in bindings.values() for e in wb.outbound.values()]
    assert len(used) == len(set(used))
    options = CompileOptions(bindings=bindings, mode=Mode.STATIC)
    web = compile_workload(ps, "shop/web", options)
    target = bindings["shop/api"].ports[8080].listen.port
    cluster = next(c for c in web.clusters if c.name == "outbound|8080||api.shop")
    assert (
        cluster.load_assignment.endpoints[0]
        .lb_endpoints[0]
        .endpoint.address.socket_address.port_value
        == target
    )


def test_options_are_not_mutated() -> None:
    options = CompileOptions()
    compile_workload(policy_set(), "shop/api", options)
    assert options == replace(options)


def _many(name: str, count: int, action: Action = Action.ALLOW) -> AuthorizationPolicy:
    return allow(
        name,
        *(
            Rule(
                sources=(Source(principals=(f"{TD}/ns/team/sa/svc-{i}",)),),
                operations=(Operation(paths=(f"/{i}/*",)),),
            )
            for i in range(count)
        ),
        action=action,
    )


def test_many_exact_caller_rules_go_to_the_principal_index() -> None:
    # A namespace suffix pattern: no URI SAN prefix covers its callers, so not indexable.
    namespace_rule = allow("ops", Rule(sources=(Source(namespaces=("*ps",)),)))
    ps = policy_set(
        _many("callers", 20),
        namespace_rule,
        _many("blocked", 20, Action.DENY),
        mode=MtlsMode.PERMISSIVE,
    )
    resources = compile_workload(ps, "shop/api")
    found = listener(resources, "inbound|8080|api.shop")
    mtls, plain = (c["filters"][0]["typed_config"]["http_filters"] for c in found["filter_chains"])
    assert [f["name"] for f in mtls[1:-1]] == RBAC_CHAIN
    vhost = route_config(resources)["virtual_hosts"][0]["typed_per_filter_config"]
    active = [name for name in RBAC_CHAIN if name in vhost]
    assert active == [
        "meshward.rbac.deny_indexed",  # DENY: every rule indexed, enforced
        "meshward.rbac.allow_indexed",  # ALLOW: indexed, verdict in metadata
        "meshward.rbac.allow",  # ALLOW: the namespace rule + the synthetic policy
    ]
    kinds = [sorted(rbac_rules(resources, name)) for name in active]
    assert kinds == [
        ["matcher"],
        ["shadow_matcher", "shadow_rules_stat_prefix"],
        ["rules", "track_per_rule_stats"],
    ]
    deny_tree = rbac_rules(resources, "meshward.rbac.deny_indexed")["matcher"]
    entries = deny_tree["matcher_tree"]["prefix_match_map"]["map"]
    assert len(entries) == 20 and "spiffe://cluster.local/ns/team/sa/svc-3" in entries
    first = entries["spiffe://cluster.local/ns/team/sa/svc-3"]["matcher"]
    action = first["matcher_list"]["matchers"][0]["on_match"]["action"]["typed_config"]
    assert action["name"] == "ns[shop]-policy[blocked]-rule[3]" and action["action"] == "DENY"
    for fallback in (first["on_no_match"], deny_tree["on_no_match"]):
        typed = fallback["action"]["typed_config"]
        assert typed["name"] == "meshward-no-indexed-deny-rule-matched"
        assert typed.get("action", "ALLOW") == "ALLOW"  # the proto default, omitted in JSON
    allow_rules = rbac_rules(resources)["rules"]["policies"]
    by_name = {f["name"]: f for f in mtls}
    assert by_name["meshward.rbac.allow_indexed"]["typed_config"]["shadow_rules_stat_prefix"] == (
        "meshward_indexed_allow_"
    )
    assert sorted(allow_rules) == ["meshward-indexed-allow", "ns[shop]-policy[ops]-rule[0]"]
    # The plaintext chain has no peer identity to look up: the indexed filters are left out
    # (their rules name callers: a plaintext request never matches them). Same route config.
    assert [f["name"] for f in plain[1:-1]] == [n for n in RBAC_CHAIN if "indexed" not in n]
    assert plain[-2] == by_name["meshward.rbac.allow"]


def test_index_threshold_and_opt_out() -> None:
    few = compile_workload(policy_set(_many("callers", 3)), "shop/api")
    assert "matcher_tree" not in json.dumps(route_config(few))
    none = compile_workload(
        policy_set(_many("callers", 40)), "shop/api", CompileOptions(rbac_index_min_rules=None)
    )
    assert "matcher_tree" not in json.dumps(route_config(none))
    indexed = compile_workload(policy_set(_many("callers", 40)), "shop/api")
    # Only indexed ALLOW rules: the tree is the ALLOW filter's engine, no synthetic policy.
    assert filter_names(indexed) == ["header_mutation", "rbac:enforce:ALLOW", "router"]
    assert list(rbac_rules(indexed)) == ["matcher"]
    # Crossing the threshold is a route change: the listeners are the same.
    assert few.listeners == none.listeners == indexed.listeners


# ---- rules in the route: a policy edit changes only the RouteConfiguration --------------------


def _listeners_and_routes(ps: PolicySet) -> tuple[dict[str, bytes], dict[str, bytes]]:
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    return (
        {m.name: m.SerializeToString(deterministic=True) for m in resources.listeners},
        {m.name: m.SerializeToString(deterministic=True) for m in resources.routes},
    )


def test_a_rule_edit_changes_the_route_and_not_the_listener() -> None:
    """Same kinds of rules, different rules: byte-identical listeners, a new route config under
    the same name (RDS pushes it; open connections get it at their next request)."""
    get = Rule(sources=(Source(principals=(WEB,)),), operations=(Operation(methods=("GET",)),))
    post = Rule(sources=(Source(principals=(WEB,)),), operations=(Operation(methods=("POST",)),))
    deny = allow("no-admin", Rule(operations=(Operation(paths=("/admin",)),)), action=Action.DENY)
    before_l, before_r = _listeners_and_routes(policy_set(allow("a", get), deny))
    after_l, after_r = _listeners_and_routes(policy_set(allow("a", post), allow("b", get), deny))
    assert before_l == after_l
    assert before_r.keys() == after_r.keys()
    assert before_r["inbound|8080|api.shop"] != after_r["inbound|8080|api.shop"]
    listener_bytes = before_l["inbound|8080|api.shop"]
    assert b"GET" not in listener_bytes and b"/admin" not in listener_bytes  # no rules in there


def test_any_rbac_policy_edit_keeps_the_listener_and_the_route_name() -> None:
    """Every inbound HTTP chain has the same RBAC filters: the first DENY policy, the first
    dry-run or AUDIT policy, crossing the index threshold, removing every policy: all only
    change the route config's content, never the listener or the route's name."""
    base = allow("a", NATIVE_RULE)
    variants = {
        "none": policy_set(),
        "allow": policy_set(base),
        "deny+allow": policy_set(base, allow("d", NATIVE_RULE, action=Action.DENY)),
        "dry-run": policy_set(base, allow("t", NATIVE_RULE, action=Action.DENY, dry_run=True)),
        "audit": policy_set(base, allow("log", NATIVE_RULE, action=Action.AUDIT)),
        "indexed": policy_set(_many("callers", 40), _many("blocked", 40, Action.DENY)),
    }
    compiled = {label: _listeners_and_routes(ps) for label, ps in variants.items()}
    listeners_of = {label: ls for label, (ls, _) in compiled.items()}
    assert all(ls == listeners_of["none"] for ls in listeners_of.values())
    for _, routes in compiled.values():
        assert {n for n in routes if n.startswith("inbound|")} == {"inbound|8080|api.shop"}
    assert len({routes["inbound|8080|api.shop"] for _, routes in compiled.values()}) == len(
        variants
    )


def test_only_extauthz_appearing_changes_the_listener_and_renames_the_route() -> None:
    """ext_authz is the one policy-dependent part of the chain (workloads that never need it
    have none). Its route is named apart, so an old chain never runs rules that count on a
    filter it lacks. Once there, what it is needed for is again only a route change."""
    base = allow("a", NATIVE_RULE)
    jwt = allow("jwt", JWT_RULE)
    custom = allow("custom", Rule(), action=Action.CUSTOM, provider="opa")
    native_l, native_r = _listeners_and_routes(policy_set(base))
    union_l, union_r = _listeners_and_routes(policy_set(base, jwt))
    always_l, always_r = _listeners_and_routes(policy_set(base, jwt, custom))
    jwt_only_l, _ = _listeners_and_routes(policy_set(jwt))
    assert native_l != union_l
    assert union_l == always_l == jwt_only_l
    assert {n for n in native_r if n.startswith("inbound|")} == {"inbound|8080|api.shop"}
    assert {n for n in union_r if n.startswith("inbound|")} == {"inbound|8080|api.shop|extauthz"}
    assert union_r["inbound|8080|api.shop|extauthz"] != always_r["inbound|8080|api.shop|extauthz"]
    with_tokens = compile_workload(
        _with_request_authn(base, jwt), "shop/api", CompileOptions(extauthz=EXTAUTHZ)
    )
    assert {m.name: m.SerializeToString(deterministic=True) for m in with_tokens.listeners} == (
        union_l
    )


def test_every_rbac_filter_has_its_own_name_and_route_config() -> None:
    dry = allow("trial", NATIVE_RULE, action=Action.DENY, dry_run=True)
    audit = allow("audit", NATIVE_RULE, action=Action.AUDIT)
    ps = policy_set(
        allow("a", NATIVE_RULE), allow("d", NATIVE_RULE, action=Action.DENY), dry, audit
    )
    resources = compile_workload(ps, "shop/api")
    chain = [f["name"] for f in http_filters(resources)]
    assert chain == ["envoy.filters.http.header_mutation", *RBAC_CHAIN, "envoy.filters.http.router"]
    vhost = route_config(resources)["virtual_hosts"][0]["typed_per_filter_config"]
    assert sorted(vhost) == [
        "meshward.rbac.allow",
        "meshward.rbac.audit",
        "meshward.rbac.deny",
        "meshward.rbac.dry_run_deny",
    ]
    for name in chain[1:-1]:
        assert name not in vhost or vhost[name]["@type"].endswith("RBACPerRoute")
        listener_side = next(f for f in http_filters(resources) if f["name"] == name)
        # No engine in the listener: the rules are only in the route.
        assert not {"rules", "shadow_rules", "matcher", "shadow_matcher"} & set(
            listener_side["typed_config"]
        )
    assert rbac_rules(resources, "meshward.rbac.dry_run_deny")["shadow_rules_stat_prefix"] == (
        "meshward_dry_run_deny_"
    )


# ---- end-user tokens: requests that may carry one go to ext_authz (401 when invalid) ----------


def _with_request_authn(*policies: AuthorizationPolicy, jwt_rule: Any = None) -> PolicySet:
    from meshward.policy.model import JwtRule, RequestAuthentication

    ra = RequestAuthentication(
        namespace="shop",
        name="jwt",
        selector={"app": "api"},
        jwt_rules=(jwt_rule or JwtRule(issuer="https://idp", jwks='{"keys": []}'),),
    )
    base = policy_set(*policies)
    return PolicySet.create(
        mesh=base.mesh,
        workloads=base.workloads,
        authorization_policies=base.authorization_policies,
        peer_authentications=base.peer_authentications,
        request_authentications=[ra],
    )


def test_request_authentication_sends_token_requests_to_extauthz_first() -> None:
    """No rule reads the JWT, yet a request with a token must be verified (401 if invalid):
    routes matching the token locations enable the token filter; the default route does not."""
    ps = _with_request_authn(allow("a", NATIVE_RULE), allow("d", NATIVE_RULE, action=Action.DENY))
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    assert resources.extauthz and not resources.placement.needs_extauthz
    assert [f["name"] for f in http_filters(resources)] == [
        "envoy.filters.http.header_mutation",
        "meshward.ext_authz.token",  # before any RBAC filter: 401 comes first, as in Istio
        *RBAC_CHAIN,
        "envoy.filters.http.ext_authz",  # off: no rule needs it (present: the chain is fixed)
        "envoy.filters.http.router",
    ]
    assert filter_names(resources) == [
        "header_mutation",
        "token:off",  # on the token routes only
        "rbac:enforce:DENY",
        "rbac:enforce:ALLOW",
        "ext_authz:off",
        "router",
    ]
    token_filter = http_filters(resources)[1]["typed_config"]
    assert "filter_enabled_metadata" not in token_filter
    assert token_filter.get("failure_mode_allow", False) is False  # fail closed
    vhost = route_config(resources)["virtual_hosts"][0]
    assert vhost["typed_per_filter_config"]["meshward.ext_authz.token"]["disabled"] is True
    routes = {r["name"]: r for r in vhost["routes"]}
    assert list(routes) == [
        "meshward-invalid-authority",  # first: 400 before authorization
        "meshward-dot-segment-parameters",  # second: 400 before authorization
        "token-header-authorization",
        "token-param",
        "default",
    ]
    header_route = routes["token-header-authorization"]
    assert header_route["match"]["headers"] == [{"name": "authorization", "present_match": True}]
    enabled = header_route["typed_per_filter_config"]["meshward.ext_authz.token"]
    assert enabled["check_settings"]["context_extensions"] == {
        "workload": "shop/api",
        "port": "8080",
    }
    assert "typed_per_filter_config" not in routes["default"]
    assert "meshward-extauthz" in {c.name for c in resources.clusters}
    with pytest.raises(UserError, match="RequestAuthentication"):
        compile_workload(ps, "shop/api")  # no ext_authz address: cannot verify tokens


def test_token_routes_follow_from_headers_and_params_and_disable_the_late_filter() -> None:
    from meshward.policy.model import JwtHeader, JwtRule

    rule = JwtRule(
        issuer="https://idp",
        jwks='{"keys": []}',
        from_headers=(JwtHeader("X-Jwt", "Bearer "),),
        from_params=("token",),
    )
    ps = _with_request_authn(allow("native", NATIVE_RULE), allow("jwt", JWT_RULE), jwt_rule=rule)
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    vhost = route_config(resources)["virtual_hosts"][0]
    routes = {r["name"]: r for r in vhost["routes"]}
    assert list(routes) == [
        "meshward-invalid-authority",
        "meshward-dot-segment-parameters",
        "token-header-x-jwt",
        "token-param",
        "default",
    ]
    for name in ("token-header-x-jwt", "token-param"):
        per_filter = routes[name]["typed_per_filter_config"]
        assert per_filter["envoy.filters.http.ext_authz"]["disabled"] is True  # decided already
        assert "check_settings" in per_filter["meshward.ext_authz.token"]
    # The default route keeps the ALLOW union: the late filter, gated, with its context.
    assert "check_settings" in vhost["typed_per_filter_config"]["envoy.filters.http.ext_authz"]


@pytest.mark.parametrize(
    ("path", "matched"),
    [
        ("/x?access_token=abc", True),
        ("/x?a=1&access_token=abc&b=2", True),
        ("/x?access%5Ftoken=abc", True),  # the service decodes the name: so must the route
        ("/x?%61ccess_token=abc", True),
        ("/x?access_token=", False),  # empty: no token
        ("/x?my_access_token=abc", False),
        ("/x?access_tokens=abc", False),
        ("/access_token=abc", False),  # not in the query
        ("/x?a=1#&access_token=abc", False),  # in the fragment
    ],
)
def test_query_token_route_matches_what_the_service_calls_a_token(path: str, matched: bool) -> None:
    import re

    from meshward.compile.authz import TokenSource, token_matches

    (route,) = token_matches([TokenSource(param="access_token")])
    regex = route["match"]["headers"][0]["string_match"]["safe_regex"]["regex"]
    assert (re.fullmatch(regex, path) is not None) is matched


# ---- header values: `*` is presence, even of an empty value ------------------------------------


def test_header_star_is_presence_not_a_non_empty_regex() -> None:
    rule = Rule(
        conditions=(
            Condition(key="request.headers[x-team]", values=("*",)),
            Condition(key="request.headers[x-env]", not_values=("*",)),
        )
    )
    resources = compile_workload(policy_set(allow("p", rule)), "shop/api")
    principal = rbac_rules(resources)["rules"]["policies"]["ns[shop]-policy[p]-rule[0]"][
        "principals"
    ][0]
    assert principal == {
        "and_ids": {
            "ids": [
                {"header": {"name": "x-team", "present_match": True}},
                {"not_id": {"header": {"name": "x-env", "present_match": True}}},
            ]
        }
    }
    assert ".+" not in json.dumps(route_config(resources))


# ---- which rule a denial names (Envoy tries RBAC policies in string order of their names) ----


def test_envoy_and_the_evaluator_name_the_same_first_matching_rule() -> None:
    """With several matching rules, Envoy's rules engine (a std::map) reports the first name in
    string order; the evaluator uses the same order (meshward.policy.ordering), so
    ``meshward policy explain`` names the rule Envoy names."""
    from meshward.compile.authz import envoy_policy_order, place_rules
    from meshward.policy import Request, evaluate
    from meshward.testing import simulate

    any_get = Rule(operations=(Operation(methods=("GET",)),))
    deny_many = allow(
        "web",
        *[Rule(operations=(Operation(paths=(f"/p{i}",)),)) for i in range(10)],
        any_get,
        action=Action.DENY,
    )
    deny_web2 = allow("web-2", any_get, action=Action.DENY)
    cases = {
        "both": (policy_set(deny_many, deny_web2, mode=MtlsMode.PERMISSIVE), "web-2]-rule[0]"),
        "one policy": (policy_set(deny_many, mode=MtlsMode.PERMISSIVE), "web]-rule[10]"),
    }
    both = cases["both"][0]
    ordered = [
        r.rbac_name for r in envoy_policy_order(place_rules(both.policies_for(both.workloads[0])))
    ]
    assert ordered[:3] == [
        "ns[shop]-policy[web-2]-rule[0]",  # '-' < ']'
        "ns[shop]-policy[web]-rule[0]",
        "ns[shop]-policy[web]-rule[10]",  # "10" < "1]"... < "2"
    ]
    for ps, tail in cases.values():
        resources = compile_workload(ps, "shop/api", CompileOptions(mode=Mode.STATIC))
        outcome = simulate.run(
            listener(resources, "inbound|8080|api.shop"),
            simulate.Connection(
                method="GET", path="/p2", host="api", headers={}, port=8080, peer_uri=None
            ),
        )
        assert outcome.detail == f"rbac_access_denied_matched_policy[ns[shop]-policy[{tail}]"
        api = ps.workload("shop/api")
        assert api is not None
        decision = evaluate(
            ps, api, Request(method="GET", path="/p2", destination_port=8080), now=datetime.now(UTC)
        )
        assert not decision.allowed and decision.policy is not None
        named = f"ns[shop]-policy[{decision.policy.split('/')[1]}]-rule[{decision.rule}]"
        assert outcome.detail == f"rbac_access_denied_matched_policy[{named}]"


# ---- the Host: one host[:port], or 400 before authorization ----------------------------------


def _route_configs(resources: Any) -> dict[str, dict[str, Any]]:
    """Every HTTP route config of a workload (xDS mode: the RDS resources)."""
    return {r.name: to_dict(r) for r in resources.routes}


def test_every_http_virtual_host_answers_an_invalid_host_with_400_first() -> None:
    """Envoy joins two Host lines into one authority ('a.shop,admin.internal'): the first route
    of every HTTP virtual host, inbound and outbound, answers it 400 with every authorization
    filter off, so the answer does not depend on the policy (as the evaluator says)."""
    from meshward.compile import names
    from meshward.policy.paths import AUTHORITY_REGEX

    ps = _with_request_authn(allow("a", NATIVE_RULE), allow("d", NATIVE_RULE, action=Action.DENY))
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    configs = _route_configs(resources)
    assert {"inbound|8080|api.shop|extauthz", "outbound|8080||web.shop"} <= set(configs)
    for name, config in configs.items():
        for vhost in config["virtual_hosts"]:
            first = vhost["routes"][0]
            assert first["name"] == names.ROUTE_INVALID_AUTHORITY, name
            assert first["match"] == {
                "prefix": "/",
                "headers": [
                    {
                        "name": ":authority",
                        "string_match": {"safe_regex": {"regex": AUTHORITY_REGEX}},
                        "invert_match": True,
                    }
                ],
            }
            assert first["direct_response"]["status"] == 400
            assert "exactly one host" in first["direct_response"]["body"]["inline_string"]
    inbound = configs["inbound|8080|api.shop|extauthz"]["virtual_hosts"][0]
    off = inbound["routes"][0]["typed_per_filter_config"]
    chain = [f["name"] for f in http_filters(resources)]
    assert set(off) == set(chain) - {
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.router",
    }
    for filter_name, config in off.items():
        if "ext_authz" in filter_name:
            assert config["disabled"] is True
        else:  # RBACPerRoute without rbac: "the global RBAC policy will be disabled"
            assert config == {"@type": T_RBAC_ROUTE}
    assert set(inbound["typed_per_filter_config"]) <= set(off)  # nothing leaks through


T_RBAC_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute"


def test_every_http_virtual_host_answers_a_dot_segment_with_parameters_with_400_second() -> None:
    """/x/%2e%2e;/admin reaches the app as /x/..;/admin (Envoy strips ';' only after LITERAL
    dot segments), which Tomcat/Jetty/Spring serve as /admin: the second route of every HTTP
    virtual host, inbound and outbound, answers it 400 with the same filters off as the first."""
    from meshward.compile import names
    from meshward.policy.paths import DOT_SEGMENT_PARAMETERS_REGEX

    ps = _with_request_authn(allow("a", NATIVE_RULE), allow("d", NATIVE_RULE, action=Action.DENY))
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    configs = _route_configs(resources)
    assert {"inbound|8080|api.shop|extauthz", "outbound|8080||web.shop"} <= set(configs)
    for name, config in configs.items():
        for vhost in config["virtual_hosts"]:
            second = vhost["routes"][1]
            assert second["name"] == names.ROUTE_DOT_SEGMENT_PARAMETERS, name
            assert second["match"] == {
                "prefix": "/",
                "headers": [
                    {
                        "name": ":path",
                        "string_match": {"safe_regex": {"regex": DOT_SEGMENT_PARAMETERS_REGEX}},
                    }
                ],
            }
            assert second["direct_response"]["status"] == 400
            assert "'..' path segment" in second["direct_response"]["body"]["inline_string"]
            first = vhost["routes"][0]
            assert second.get("typed_per_filter_config") == first.get("typed_per_filter_config")
    inbound = configs["inbound|8080|api.shop|extauthz"]["virtual_hosts"][0]
    assert inbound["routes"][1]["typed_per_filter_config"]  # authorization filters off


@pytest.mark.parametrize(
    ("path", "rejected"),
    [
        ("/x/%2e%2e;/admin", True),
        ("/a/%2e;/b", True),
        ("/%2E%2E;x/admin", True),
        ("/a/.%2e;x=1/b?q=1", True),
        ("/ok?next=/..;/x", False),  # the query is not the path
        ("/x/..;/admin", False),  # a literal dot segment loses its parameters: /admin
        ("/a/...;/b", False),
        ("/a/..%3b/b", True),  # an escaped ';' counts as the raw one
        ("/x/%2e%2E%3B/admin", True),
        ("/a/b..%3b/c", False),
        ("/x", False),
    ],
)
def test_a_dot_segment_with_parameters_is_rejected_before_authorization(
    path: str, rejected: bool
) -> None:
    """The simulated sidecar and the evaluator agree, whatever the policy: 400 before any rule."""
    from meshward.policy import Request, evaluate
    from meshward.testing import simulate

    web = Source(principals=(WEB,))
    ps = policy_set(
        allow("reads", Rule(sources=(web,), operations=(Operation(methods=("GET",)),))),
        mode=MtlsMode.PERMISSIVE,
    )
    resources = compile_workload(ps, "shop/api", CompileOptions(mode=Mode.STATIC))
    api = ps.workload("shop/api")
    assert api is not None
    for peer, method in ((f"spiffe://{WEB}", "GET"), (f"spiffe://{WEB}", "POST"), (None, "GET")):
        outcome = simulate.run(
            listener(resources, "inbound|8080|api.shop"),
            simulate.Connection(
                method=method, path=path, host="api.shop", headers={}, port=8080, peer_uri=peer
            ),
        )
        decision = evaluate(
            ps,
            api,
            Request(method=method, path=path, host="api.shop", destination_port=8080,
                    source_principal=peer),
            now=datetime.now(UTC),
        )  # fmt: skip
        if rejected:
            assert (outcome.status, outcome.detail) == (400, "direct_response")
            assert not decision.allowed
            assert decision.reason.startswith("rejected before authorization (HTTP 400): path")
        else:
            assert outcome.status == (200 if decision.allowed else 403)


def test_every_http_connection_manager_strips_a_trailing_host_dot() -> None:
    ps = _with_request_authn(allow("a", NATIVE_RULE))
    resources = compile_workload(ps, "shop/api", CompileOptions(extauthz=EXTAUTHZ))
    hcms = [
        f["typed_config"]
        for lst in map(to_dict, resources.listeners)
        for chain in lst["filter_chains"]
        for f in chain["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    assert len(hcms) >= 2  # inbound and outbound
    assert all(h["strip_trailing_host_dot"] is True for h in hcms)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("api.shop", 200),
        ("API.shop:8080", 200),
        ("10.0.0.1:8080", 200),
        ("[::1]:8080", 200),
        ("api.shop,admin.internal", 400),
        ("admin.internal,api.shop", 400),
        ("api.shop, api.shop", 400),
        ("user@api.shop", 400),
        ("%61pi.shop", 400),
        ("api.shop;x", 400),
        ("admin.internal.", 403),  # the trailing dot is stripped: the DENY on the host applies
        ("admin.internal.:8080", 403),
        ("api.shop.", 200),
    ],
)
def test_a_host_that_is_not_one_host_is_rejected_before_authorization(
    host: str, status: int
) -> None:
    """Whatever the policy says (here: web may GET, nothing else; admin.internal denied), the
    simulated sidecar and the evaluator agree: 400 before any rule, else the rules decide."""
    from meshward.policy import Request, evaluate
    from meshward.testing import simulate

    web = Source(principals=(WEB,))
    ps = policy_set(
        allow("reads", Rule(sources=(web,), operations=(Operation(methods=("GET",)),))),
        allow(
            "no-admin",
            Rule(operations=(Operation(hosts=("admin.internal",)),)),
            action=Action.DENY,
        ),
        mode=MtlsMode.PERMISSIVE,
    )
    resources = compile_workload(ps, "shop/api", CompileOptions(mode=Mode.STATIC))
    api = ps.workload("shop/api")
    assert api is not None
    for peer, method in ((f"spiffe://{WEB}", "GET"), (f"spiffe://{WEB}", "POST"), (None, "GET")):
        outcome = simulate.run(
            listener(resources, "inbound|8080|api.shop"),
            simulate.Connection(
                method=method, path="/x", host=host, headers={}, port=8080, peer_uri=peer
            ),
        )
        decision = evaluate(
            ps,
            api,
            Request(
                method=method,
                path="/x",
                host=host,
                destination_port=8080,
                source_principal=peer,
            ),
            now=datetime.now(UTC),
        )
        if status == 400:
            assert (outcome.status, outcome.detail) == (400, "direct_response")
            assert not decision.allowed
            assert decision.reason.startswith("rejected before authorization (HTTP 400): Host")
        else:
            assert outcome.status == (200 if decision.allowed else 403)
