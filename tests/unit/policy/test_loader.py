"""Loading and validation: Istio documents load unchanged; every problem is reported at once
with file#index, field path and reason."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshward.policy import (
    Action,
    MtlsMode,
    PolicyError,
    Problem,
    Protocol,
    load,
    parse,
)

WORKLOAD = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin}}
spec: {ports: [{port: 8000}]}
"""


def problems(texts: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse(texts)
    return [str(p) for p in info.value.problems]


def policy(spec: str, *, name: str = "p", namespace: str = "foo", extra_meta: str = "") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n{extra_meta}spec:\n{spec}"
    )


def test_problem_format_matches_the_issue() -> None:
    p = Problem(
        "policies/shop.yaml",
        3,
        "spec.rules[0].to[0].operation.methods",
        "expected a list of strings",
    )
    assert str(p) == (
        "policies/shop.yaml#3 spec.rules[0].to[0].operation.methods: expected a list of strings"
    )
    assert str(Problem("a.yaml", 0, "", "invalid YAML")) == "a.yaml: invalid YAML"


def test_methods_not_a_list_reports_file_index_and_field() -> None:
    bad = policy("  rules:\n  - to:\n    - operation:\n        methods: GET\n")
    found = problems(
        {
            "shop.yaml": "---\n"
            + WORKLOAD
            + "---\n"
            + WORKLOAD.replace("httpbin", "x")
            + "---\n"
            + bad
        }
    )
    assert found == [
        "shop.yaml#3 spec.rules[0].to[0].operation.methods: expected a list of strings"
    ]


def test_all_problems_are_reported_at_once() -> None:
    texts = {
        "a.yaml": policy(
            "  selector:\n    matchLabel: {app: x}\n"  # typo
            "  action: PERMIT\n"
            "  rules:\n  - from:\n    - source: {ipBlocks: ['10.0.0.300'], principals: [1]}\n"
            "    to:\n    - operation: {ports: ['0', '70000', 'http'], paths: ['/a*b']}\n"
            "    when:\n    - key: request.header[x]\n      values: [a]\n"
            "    - key: source.ip\n      values: ['nope']\n"
        ),
        "b.yaml": "kind: Workload\napiVersion: meshward.dev/v1\nmetadata: {name: Bad_Name}\n",
    }
    found = problems(texts)
    text = "\n".join(found)
    assert "a.yaml#1 spec.selector.matchLabel: unknown field (did you mean 'matchLabels'?)" in found
    assert "a.yaml#1 spec.action: 'PERMIT' is not one of ALLOW, DENY, AUDIT, CUSTOM" in found
    assert (
        "a.yaml#1 spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.300' is not an IP address or CIDR block"
        in found
    )
    assert "a.yaml#1 spec.rules[0].from[0].source.principals: expected a list of strings" in found
    assert (
        "a.yaml#1 spec.rules[0].to[0].operation.ports[0]: '0' is not a port number (1-65535)"
        in found
    )
    assert "spec.rules[0].to[0].operation.ports[1]: '70000'" in text
    assert "spec.rules[0].to[0].operation.ports[2]: 'http'" in text
    assert "spec.rules[0].to[0].operation.paths[0]" in text
    assert "a.yaml#1 spec.rules[0].when[0].key: unknown key 'request.header[x]'" in text
    assert (
        "a.yaml#1 spec.rules[0].when[1].values[0]: 'nope' is not an IP address or CIDR block"
        in found
    )
    assert "b.yaml#1 metadata.name: 'Bad_Name' is not a valid name" in found
    assert len(found) >= 11


def test_unknown_fields_are_errors_with_suggestions() -> None:
    found = problems({"a.yaml": policy("  rules:\n  - form:\n    - source: {principals: [x]}\n")})
    assert found == ["a.yaml#1 spec.rules[0].form: unknown field (did you mean 'from'?)"]
    found = problems({"a.yaml": policy("  rules:\n  - from:\n    - source: {principal: [x]}\n")})
    assert found == [
        "a.yaml#1 spec.rules[0].from[0].source.principal: unknown field (did you mean 'principals'?)"
    ]


def test_duplicate_names_across_files() -> None:
    p = policy("  action: ALLOW\n")
    found = problems({"a.yaml": p, "b.yaml": p})
    assert found == [
        "b.yaml#1 metadata.name: duplicate AuthorizationPolicy foo/p (first defined at a.yaml#1)"
    ]
    # same name in another namespace, or another kind, is fine
    parse({"a.yaml": p, "b.yaml": policy("  action: ALLOW\n", namespace="bar")})


def test_duplicate_yaml_keys_are_errors() -> None:
    found = problems({"a.yaml": policy("  action: ALLOW\n  action: DENY\n")})
    assert len(found) == 1 and "duplicate key 'action'" in found[0]


def test_yaml_syntax_error_names_the_document_and_line() -> None:
    found = problems({"a.yaml": WORKLOAD + "---\nkind: [unclosed\n"})
    assert len(found) == 1 and found[0].startswith("a.yaml#2: invalid YAML (line")


def test_experimental_keys_are_refused_clearly() -> None:
    p = policy(
        "  rules:\n  - when:\n    - key: experimental.envoy.filters.a.b[c]\n      values: [x]\n"
    )
    (found,) = problems({"a.yaml": p})
    assert found.startswith("a.yaml#1 spec.rules[0].when[0].key: unsupported key 'experimental.")


def test_unknown_and_missing_kinds_are_errors() -> None:
    svc = "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n"
    [found] = problems({"a.yaml": svc + "---\n" + WORKLOAD})
    assert found.startswith("a.yaml#1 kind: unknown kind 'Service'; policy files hold ")
    found = problems({"a.yaml": "apiVersion: v1\nmetadata: {name: x}\n"})
    assert found == ["a.yaml#1 kind: missing (e.g. kind: AuthorizationPolicy)"]
    [typo] = problems({"a.yaml": "apiVersion: security.istio.io/v1\nkind: AuthorisationPolicy\n"})
    assert "did you mean 'AuthorizationPolicy'" in typo


@pytest.mark.parametrize("pattern", ["admin", "admin/*", "admin*", "{*}/admin", "api/v1"])
def test_a_path_without_a_leading_slash_is_an_error(pattern: str) -> None:
    """Request paths always start with '/': such a pattern never matches, which in a DENY's
    paths (or an ALLOW's notPaths) silently lets through what it was meant to stop."""
    for field in ("paths", "notPaths"):
        spec = (
            "  selector: {matchLabels: {app: httpbin}}\n  action: DENY\n  rules:\n"
            f"  - to: [{{operation: {{{field}: ['{pattern}']}}}}]\n"
        )
        [found] = problems({"a.yaml": WORKLOAD + "---\n" + policy(spec)})
        assert (
            f"spec.rules[0].to[0].operation.{field}[0]: {pattern!r} does not start with '/'"
            in found
        )


@pytest.mark.parametrize("pattern", ["*", "*.php", "*/admin", "/admin", "/admin*", "/a/{*}"])
def test_paths_that_can_match_still_load(pattern: str) -> None:
    spec = (
        "  selector: {matchLabels: {app: httpbin}}\n  action: DENY\n  rules:\n"
        f"  - to: [{{operation: {{paths: ['{pattern}']}}}}]\n"
    )
    assert parse({"a.yaml": WORKLOAD + "---\n" + policy(spec)}).authorization_policies


def test_policy_tests_documents_are_skipped() -> None:
    ps = parse({"c.yaml": "apiVersion: meshward.dev/v1\nkind: PolicyTests\ncases: []\n"})
    assert ps.warnings == () and ps.authorization_policies == ()


def test_api_versions() -> None:
    for version in ("security.istio.io/v1", "security.istio.io/v1beta1"):
        parse({"a.yaml": policy("  {}\n").replace("security.istio.io/v1", version)})
    found = problems(
        {"a.yaml": policy("  {}\n").replace("security.istio.io/v1", "security.istio.io/v1alpha1")}
    )
    assert "a.yaml#1 apiVersion: 'security.istio.io/v1alpha1' is not supported" in found[0]
    found = problems({"a.yaml": WORKLOAD.replace("meshward.dev/v1", "meshward.dev/v2")})
    assert "use meshward.dev/v1" in found[0]


def test_workload_defaults_and_fields() -> None:
    ps = parse(
        {
            "w.yaml": """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  address: 10.0.0.7
  ports:
    - {port: 8080}
    - {name: grpc, port: 9090, protocol: grpc}
    - {name: db, port: "5432", protocol: TCP}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: worker, namespace: shop}
spec: {serviceAccount: batch}
"""
        }
    )
    api = ps.workload("shop/api")
    assert api is not None
    assert api.service_account == "api"
    assert api.address == "10.0.0.7"
    assert [(p.name, p.port, p.protocol) for p in api.ports] == [
        ("http-8080", 8080, Protocol.HTTP),
        ("grpc", 9090, Protocol.GRPC),
        ("db", 5432, Protocol.TCP),
    ]
    worker = ps.workload("shop/worker")
    assert (
        worker is not None and worker.principal("cluster.local") == "cluster.local/ns/shop/sa/batch"
    )
    assert api.origin is not None and str(api.origin) == "w.yaml#1"


def test_workload_port_problems() -> None:
    found = problems(
        {
            "w.yaml": WORKLOAD.replace(
                "spec: {ports: [{port: 8000}]}",
                "spec: {ports: [{port: 8000}, {port: 8000, name: b}, {port: 0}, {port: 1, protocol: UDP}]}",
            )
        }
    )
    assert found == [
        "w.yaml#1 spec.ports[1].port: port 8000 is listed twice",
        "w.yaml#1 spec.ports[2].port: 0 is not a port number (1-65535)",
        "w.yaml#1 spec.ports[3].protocol: 'UDP' is not one of HTTP, HTTP2, GRPC, TCP",
    ]


def test_label_values_must_be_strings() -> None:
    found = problems({"w.yaml": WORKLOAD.replace("labels: {app: httpbin}", "labels: {version: 1}")})
    assert found == [
        "w.yaml#1 metadata.labels.version: label values are strings, got a number (quote it)"
    ]


def test_every_source_operation_and_condition_field_loads() -> None:
    ps = parse(
        {
            "a.yaml": policy(
                """  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/c/*"]
        notPrincipals: ["*-x"]
        requestPrincipals: ["iss/sub"]
        notRequestPrincipals: ["iss/bad"]
        namespaces: ["a"]
        notNamespaces: ["b*"]
        ipBlocks: ["10.0.0.0/8"]
        notIpBlocks: ["10.1.0.0/16"]
        remoteIpBlocks: ["1.2.3.4"]
        notRemoteIpBlocks: ["::1/128"]
    - source:
        serviceAccounts: ["ns2/sa2", "local-sa"]
        notServiceAccounts: ["ns3/sa3"]
    to:
    - operation:
        hosts: ["a.com"]
        notHosts: ["*.b.com"]
        ports: ["80", 8080]
        notPorts: ["81"]
        methods: ["GET"]
        notMethods: ["POST"]
        paths: ["/a/{*}"]
        notPaths: ["/b*"]
    when:
    - key: request.auth.claims[groups][admin]
      values: ["yes"]
      notValues: ["no"]
    - key: destination.port
      values: [91]
"""
            )
        }
    )
    (ap,) = ps.authorization_policies
    assert ap.action is Action.DENY and ap.selector == {"app": "httpbin"}
    s0, s1 = ap.rules[0].sources
    assert s0.principals == ("cluster.local/ns/a/sa/b", "cluster.local/ns/c/*")
    assert s0.not_remote_ip_blocks == ("::1/128",)
    assert s1.principals == ("cluster.local/ns/ns2/sa/sa2", "cluster.local/ns/foo/sa/local-sa")
    assert s1.not_principals == ("cluster.local/ns/ns3/sa/sa3",)
    (op,) = ap.rules[0].operations
    assert op.ports == (80, 8080) and op.not_ports == (81,)
    assert op.paths == ("/a/{*}",)
    c0, c1 = ap.rules[0].conditions
    assert c0.key == "request.auth.claims[groups][admin]" and c0.not_values == ("no",)
    assert c1.values == ("91",)


def test_service_accounts_use_the_mesh_trust_domain_and_exclude_principals() -> None:
    mesh = "apiVersion: meshward.dev/v1\nkind: MeshConfig\nspec: {trustDomain: example.org}\n"
    p = policy("  rules:\n  - from:\n    - source: {serviceAccounts: [sa]}\n")
    ps = parse({"m.yaml": mesh, "p.yaml": p})
    assert ps.authorization_policies[0].rules[0].sources[0].principals == (
        "example.org/ns/foo/sa/sa",
    )
    both = policy("  rules:\n  - from:\n    - source: {serviceAccounts: [sa], principals: [x]}\n")
    (found,) = problems({"p.yaml": both})
    assert "serviceAccounts: cannot be combined with principals" in found
    wild = policy("  rules:\n  - from:\n    - source: {serviceAccounts: ['ns/*']}\n")
    assert "is not a service account" in problems({"p.yaml": wild})[0]


def test_empty_source_operation_and_condition_are_errors_as_in_istio() -> None:
    p = policy(
        "  rules:\n  - from:\n    - source: {}\n    to:\n    - {}\n    when:\n    - key: source.ip\n"
    )
    assert problems({"p.yaml": p}) == [
        "p.yaml#1 spec.rules[0].from[0].source: must set at least one field",
        "p.yaml#1 spec.rules[0].to[0].operation: required (a `to` entry needs an operation)",
        "p.yaml#1 spec.rules[0].when[0]: set values or notValues (or both)",
    ]


def test_wildcards_only_at_the_ends() -> None:
    p = policy("  rules:\n  - from:\n    - source: {principals: ['a*b*'], namespaces: ['*a*']}\n")
    found = problems({"p.yaml": p})
    assert len(found) == 2 and all("'*' is allowed only once" in f for f in found)


def test_annotations_dry_run_and_expiry() -> None:
    meta = (
        "  annotations:\n    istio.io/dry-run: 'true'\n"
        "    meshward.dev/expires-at: '2030-01-31T18:00:00+01:00'\n"
    )
    ps = parse({"p.yaml": policy("  action: DENY\n  rules: [{}]\n", extra_meta=meta)})
    ap = ps.authorization_policies[0]
    assert ap.dry_run is True
    assert ap.expires_at == datetime(2030, 1, 31, 17, 0, tzinfo=UTC)
    bad = "  annotations:\n    istio.io/dry-run: 'yes'\n    meshward.dev/expires-at: '2030-01-31'\n"
    assert problems({"p.yaml": policy("  {}\n", extra_meta=bad)}) == [
        'p.yaml#1 metadata.annotations[istio.io/dry-run]: expected "true" or "false", got \'yes\'',
        "p.yaml#1 metadata.annotations[meshward.dev/expires-at]: '2030-01-31' is not an RFC 3339 "
        "timestamp (e.g. 2030-01-31T18:00:00Z)",
    ]
    naive = "  annotations:\n    meshward.dev/expires-at: '2030-01-31T18:00:00'\n"
    assert "needs a time zone" in problems({"p.yaml": policy("  {}\n", extra_meta=naive)})[0]


def test_custom_action_needs_a_provider_and_no_dry_run() -> None:
    assert problems({"p.yaml": policy("  action: CUSTOM\n  rules: [{}]\n")}) == [
        "p.yaml#1 spec.provider: required when action is CUSTOM"
    ]
    ps = parse({"p.yaml": policy("  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]\n")})
    assert ps.authorization_policies[0].provider == "opa"
    assert problems({"p.yaml": policy("  provider: {name: opa}\n")}) == [
        "p.yaml#1 spec.provider: allowed only when action is CUSTOM"
    ]


def test_target_refs_are_refused() -> None:
    found = problems({"p.yaml": policy("  targetRefs: [{kind: Gateway, name: gw}]\n")})
    assert "spec.targetRefs: not supported" in found[0]


def test_kubectl_exports_load_unchanged() -> None:
    exported = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata:\n  name: p\n  namespace: foo\n  uid: 1234\n  resourceVersion: '9'\n"
        "  creationTimestamp: '2024-01-01T00:00:00Z'\n  generation: 2\n"
        "  annotations: {kubectl.kubernetes.io/last-applied-configuration: '{}'}\n"
        "spec: {action: ALLOW}\nstatus: {validationMessages: []}\n"
    )
    parse({"p.yaml": exported})


def test_missing_namespace_defaults_to_default() -> None:
    ps = parse({"p.yaml": policy("  {}\n").replace("  namespace: foo\n", "")})
    assert ps.authorization_policies[0].namespace == "default"


def test_peer_authentication() -> None:
    ps = parse(
        {
            "pa.yaml": """
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: pa, namespace: foo}
spec:
  selector: {matchLabels: {app: x}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: PERMISSIVE}
    "9090": {mode: DISABLE}
"""
        }
    )
    (pa,) = ps.peer_authentications
    assert pa.mode is MtlsMode.STRICT
    assert pa.port_level == {8080: MtlsMode.PERMISSIVE, 9090: MtlsMode.DISABLE}
    found = problems(
        {
            "pa.yaml": "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            "metadata: {name: pa, namespace: foo}\nspec:\n  mtls: {mode: strict}\n"
            "  portLevelMtls: {80: {mode: STRICT}}\n"
        }
    )
    assert found == [
        "pa.yaml#1 spec.mtls.mode: 'strict' is not one of UNSET, STRICT, PERMISSIVE, DISABLE",
        "pa.yaml#1 spec.portLevelMtls: needs spec.selector (port-level modes apply to selected "
        "workloads only)",
    ]


def test_request_authentication() -> None:
    ps = parse(
        {
            "ra.yaml": """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules:
  - issuer: https://issuer.example
    audiences: [api]
    jwks: '{"keys": []}'
    fromHeaders: [{name: x-token, prefix: "Bearer "}]
    fromParams: [token]
    outputPayloadToHeader: x-jwt-payload
    forwardOriginalToken: true
  - issuer: https://other.example
    jwksUri: https://other.example/jwks.json
"""
        }
    )
    (ra,) = ps.request_authentications
    first, second = ra.jwt_rules
    assert first.from_headers[0].prefix == "Bearer " and first.from_params == ("token",)
    assert first.forward_original_token and first.output_payload_to_header == "x-jwt-payload"
    assert second.jwks_uri == "https://other.example/jwks.json"
    found = problems(
        {
            "ra.yaml": "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
            "metadata: {name: jwt, namespace: foo}\nspec:\n  jwtRules:\n"
            "  - {issuer: a, jwks: 'not json'}\n  - {issuer: a, jwksUri: ftp://x}\n"
            "  - {issuer: b}\n  - {issuer: c, jwksUri: 'https://c', fromCookies: [s]}\n"
            "  - {issuer: d, jwksUri: 'file:///etc/jwks.json'}\n"
        }
    )
    text = "\n".join(found)
    assert not [p for p in found if "file:///etc/jwks.json" in p]  # a local JWKS file is fine
    assert "spec.jwtRules[0].jwks: not valid JSON" in text
    assert "spec.jwtRules[1].jwksUri: 'ftp://x' is not an http(s):// or file:/// URL" in text
    assert "spec.jwtRules[1].issuer: issuer 'a' is listed twice" in text
    assert "spec.jwtRules[2]: set jwks (inline JSON) or jwksUri" in text
    assert "spec.jwtRules[3].fromCookies: supported by Istio but not (yet) by Meshward" in text


def test_mesh_config() -> None:
    ps = parse(
        {
            "m.yaml": "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
            "spec: {trustDomain: example.org, rootNamespace: istio-system}\n"
        }
    )
    assert ps.mesh.trust_domain == "example.org" and ps.mesh.root_namespace == "istio-system"
    two = "apiVersion: meshward.dev/v1\nkind: MeshConfig\nspec: {}\n"
    assert "a second MeshConfig" in problems({"a.yaml": two, "b.yaml": two})[0]


def test_load_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "sub" / "w.yaml").write_text(WORKLOAD)
    (tmp_path / "p.yml").write_text(policy("  {}\n"))
    (tmp_path / "notes.txt").write_text("not yaml: [")
    (tmp_path / ".hidden" / "x.yaml").write_text("garbage: [")
    ps = load([tmp_path])
    assert len(ps.workloads) == 1 and len(ps.authorization_policies) == 1
    assert load([tmp_path / "sub" / "w.yaml"]).workloads == ps.workloads
    with pytest.raises(PolicyError) as info:
        load([tmp_path / "missing.yaml", tmp_path / ".hidden"])
    assert [p.reason for p in info.value.problems] == [
        "no such file or directory",
        "directory holds no *.yaml or *.yml",
    ] or "no such file or directory" in str(info.value)


def test_policy_error_is_a_user_error_with_every_problem() -> None:
    from meshward.errors import UserError

    with pytest.raises(UserError) as info:
        parse({"a.yaml": "- 1\n", "b.yaml": "- 2\n"})
    message = str(info.value)
    assert message.splitlines()[0] == "2 problems in policy files; fix them and re-run"
    assert "a.yaml#1: expected a mapping with apiVersion and kind, got a list" in message
