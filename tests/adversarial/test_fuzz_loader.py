"""Fuzzing the policy loader (hypothesis): whatever the bytes, `parse` returns a PolicySet or
raises PolicyError, and nothing else. The control plane and ext_authz load policy files an
operator (or a compromised CI job) writes; any other exception would stop a watcher from
reporting "rejected, old version stays", or crash `meshward policy validate`.

Three generators, from raw to structured: arbitrary text; YAML-shaped token soup (anchors,
aliases, tags, flow and block collections); and documents built from the schema's own
vocabulary with values of every YAML type, dumped as YAML. A set that loads must also compile
for every workload (the compiler is the next consumer of whatever the loader accepts).
"""

from __future__ import annotations

import contextlib
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.compile import CompileOptions, Endpoint, compile_workload
from meshward.errors import UserError
from meshward.policy import PolicyError, parse

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def load_or_reject(text: str) -> None:
    try:
        policy_set = parse({"fuzz.yaml": text})
    except PolicyError as exc:
        assert exc.problems and all(p.file == "fuzz.yaml" for p in exc.problems)
        str(exc)  # renders
        return
    assert policy_set.version == parse({"fuzz.yaml": text}).version  # deterministic
    options = CompileOptions(extauthz=Endpoint("127.0.0.1", 9191))
    for workload in policy_set.workloads:
        # An operator error with a message (e.g. conflicting ports) is fine; nothing else is.
        with contextlib.suppress(UserError):
            compile_workload(policy_set, workload, options)


@SETTINGS
@given(st.text(max_size=400))
def test_arbitrary_text(text: str) -> None:
    load_or_reject(text)


TOKENS = [
    "[", "]", "{", "}", ", ", ": ", "- ", "\n", "  ", "    ", "&a ", "*a", "&b ", "*b", "<<: ",
    "!!str ", "!!int ", "!!binary ", "!!set ", "!!omap ", "!!python/object:os.system ", "? ",
    "'", '"', "#", "---\n", "...\n", "|\n", ">\n", "%YAML 1.1\n", "\t", "~", "null", "true",
    "0x1F", "0o17", "1_000", "1e400", ".inf", ".nan", "-0", "2026-01-01", "12:30:00",
    "kind", "AuthorizationPolicy", "Workload", "RequestAuthentication", "PeerAuthentication",
    "MeshConfig", "apiVersion", "security.istio.io/v1", "meshward.dev/v1", "metadata", "name",
    "namespace", "spec", "rules", "from", "to", "when", "source", "operation", "principals",
    "paths", "ports", "port", "key", "values", "jwtRules", "jwks", "issuer", "selector",
    "matchLabels", "action", "DENY", "ALLOW", "CUSTOM", "mtls", "mode", "STRICT", "annotations",
    "meshward.dev/expires-at", "istio.io/dry-run", "/admin*", "*", "9" * 30, "\u00b2", "\u0663",
    "\x00", "\ufeff", "\ud7ff", "é",
]  # fmt: skip


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_yaml_shaped_token_soup(tokens: list[str]) -> None:
    load_or_reject("".join(tokens))


KEYS = [
    "apiVersion", "kind", "metadata", "spec", "name", "namespace", "labels", "annotations",
    "selector", "matchLabels", "action", "provider", "rules", "from", "to", "when", "source",
    "operation", "principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks",
    "notIpBlocks", "remoteIpBlocks", "requestPrincipals", "notRequestPrincipals", "hosts",
    "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths", "key",
    "values", "notValues", "mtls", "mode", "portLevelMtls", "jwtRules", "issuer", "audiences",
    "jwks", "jwksUri", "fromHeaders", "fromParams", "prefix", "outputPayloadToHeader",
    "forwardOriginalToken", "port", "protocol", "serviceAccount", "address", "trustDomain",
    "rootNamespace", "meshward.dev/expires-at", "istio.io/dry-run", "targetRef", "app",
]  # fmt: skip
STRINGS = [
    "AuthorizationPolicy", "Workload", "PeerAuthentication", "RequestAuthentication",
    "MeshConfig", "security.istio.io/v1", "security.istio.io/v1beta1", "meshward.dev/v1",
    "shop", "api", "meshward-system", "ALLOW", "DENY", "AUDIT", "CUSTOM", "STRICT",
    "PERMISSIVE", "DISABLE", "UNSET", "GET", "/admin", "/admin/*", "*", "*/x", "/a/{*}/b",
    "/{**}", "cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/web",
    "10.0.0.0/8", "::/0", "1.2.3.4/99", "request.auth.claims[groups]", "request.headers[x]",
    "source.ip", "destination.port", "request.auth.principal", "connection.sni", "8080", "0",
    "99999", "2030-01-31T18:00:00Z", "2030-01-31", "yesterday", "true", '{"keys": []}',
    '{"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}', "https://issuer.example", "file:///x",
    "HTTP", "TCP", "GRPC", "", " ", "\u00b2", "é", "a" * 300,
]  # fmt: skip

scalars = st.one_of(
    st.sampled_from(STRINGS),
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars), inner, max_size=5),
    ),
    max_leaves=40,
)


@st.composite
def documents(draw: Any) -> dict[Any, Any]:
    doc: dict[Any, Any] = draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
    kind = draw(st.sampled_from(["AuthorizationPolicy", "Workload", "PeerAuthentication",
                                 "RequestAuthentication", "MeshConfig", None]))  # fmt: skip
    if kind is not None:
        doc["kind"] = kind
        doc["apiVersion"] = draw(st.sampled_from(["security.istio.io/v1", "meshward.dev/v1"]))
        doc["metadata"] = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["a", "b", "web"]), "namespace": st.just("shop")},
                    optional={"labels": values, "annotations": values},
                ),
                values,
            )
        )
        doc["spec"] = draw(st.one_of(st.dictionaries(st.sampled_from(KEYS), values), values))
    return doc


@SETTINGS
@given(st.lists(documents(), min_size=1, max_size=4))
def test_schema_shaped_documents(docs: list[dict[Any, Any]]) -> None:
    load_or_reject(yaml.safe_dump_all(docs, allow_unicode=True))


# Valid documents, then a few mutations: every field's validation and the compiler get reached.
JWKS = (
    '{"keys":[{"kty":"EC","crv":"P-256","x":"-6SN1huMv5zaCKZf6TnEqpLTiU740tjmR-XUe55ccO4",'
    '"y":"8TLn-XrxOqkCU1Ok_HvIhyl22pEX1VyXe_uXy9Ky4gU","kid":"k","alg":"ES256"}]}'
)
VALID: list[dict[str, Any]] = [
    {"apiVersion": "meshward.dev/v1", "kind": "MeshConfig", "metadata": {"name": "mesh"},
     "spec": {"trustDomain": "cluster.local", "rootNamespace": "meshward-system"}},
    {"apiVersion": "meshward.dev/v1", "kind": "Workload",
     "metadata": {"name": "api", "namespace": "shop", "labels": {"app": "api"}},
     "spec": {"serviceAccount": "api", "ports": [{"name": "http", "port": 8080, "protocol": "HTTP"},
                                                  {"name": "tcp", "port": 7000, "protocol": "TCP"}]}},
    {"apiVersion": "meshward.dev/v1", "kind": "Workload",
     "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
     "spec": {"ports": [{"name": "http", "port": 8080}]}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "allow", "namespace": "shop",
                  "annotations": {"meshward.dev/expires-at": "2030-01-31T18:00:00Z"}},
     "spec": {"selector": {"matchLabels": {"app": "api"}}, "action": "ALLOW",
              "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"],
                                              "namespaces": ["shop"], "ipBlocks": ["10.0.0.0/8"],
                                              "requestPrincipals": ["https://issuer.example/*"]}}],
                         "to": [{"operation": {"methods": ["GET"], "paths": ["/api/*", "/a/{*}/b"],
                                               "hosts": ["api.shop"], "ports": ["8080"]}}],
                         "when": [{"key": "request.auth.claims[groups]", "values": ["admin"]},
                                  {"key": "request.headers[x-team]", "notValues": ["blue"]},
                                  {"key": "destination.port", "values": ["8080"]}]}]}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "deny", "namespace": "shop", "annotations": {"istio.io/dry-run": "true"}},
     "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"notPaths": ["/public*"]}}]}]}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
     "metadata": {"name": "ext", "namespace": "shop"},
     "spec": {"action": "CUSTOM", "provider": {"name": "meshward"}, "rules": [{}]}},
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "strict", "namespace": "shop"},
     "spec": {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"},
              "portLevelMtls": {"7000": {"mode": "PERMISSIVE"}}}},
    {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
     "metadata": {"name": "jwt", "namespace": "shop"},
     "spec": {"selector": {"matchLabels": {"app": "api"}},
              "jwtRules": [{"issuer": "https://issuer.example", "jwks": JWKS,
                            "audiences": ["api"], "fromHeaders": [{"name": "x-jwt", "prefix": "B "}],
                            "fromParams": ["t"], "outputPayloadToHeader": "x-payload"}]}},
]  # fmt: skip


def _mutate(draw: Any, node: Any, depth: int = 0) -> Any:
    """Replace, drop or add one thing somewhere below ``node`` (a random walk down)."""
    if isinstance(node, dict) and node and depth < 8 and draw(st.integers(0, 3)):
        key = draw(st.sampled_from(sorted(node, key=str)))
        action = draw(st.sampled_from(["descend", "descend", "replace", "drop", "add"]))
        copy = dict(node)
        if action == "descend":
            copy[key] = _mutate(draw, node[key], depth + 1)
        elif action == "replace":
            copy[key] = draw(values)
        elif action == "drop":
            del copy[key]
        else:
            copy[draw(st.sampled_from(KEYS))] = draw(values)
        return copy
    if isinstance(node, list) and node and depth < 8 and draw(st.integers(0, 3)):
        index = draw(st.integers(0, len(node) - 1))
        copy = list(node)
        if draw(st.booleans()):
            copy[index] = _mutate(draw, node[index], depth + 1)
        else:
            copy.append(draw(values))
        return copy
    return draw(st.one_of(values, st.sampled_from(STRINGS)))


@st.composite
def nearly_valid(draw: Any) -> list[dict[str, Any]]:
    docs = [doc for doc in VALID if draw(st.integers(0, 4))]
    for _ in range(draw(st.integers(0, 3))):
        if docs:
            index = draw(st.integers(0, len(docs) - 1))
            docs[index] = _mutate(draw, docs[index])
    return docs


def test_the_valid_skeleton_loads_and_compiles() -> None:
    """Without this, the mutation fuzz below could be mutating a set that never loads."""
    policy_set = parse({"valid.yaml": yaml.safe_dump_all(VALID)})
    assert len(policy_set.workloads) == 2 and len(policy_set.authorization_policies) == 3
    load_or_reject(yaml.safe_dump_all(VALID))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nearly_valid())
def test_nearly_valid_documents(docs: list[dict[str, Any]]) -> None:
    load_or_reject(yaml.safe_dump_all(docs, allow_unicode=True))
