"""Reachability agrees with `policy explain` on every workload pair and probe; blast radius is
the graph's transitive closure; both stay bounded on big inputs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.flows import reach
from meshward.flows.reach import OTHER, blast_radius, probes_for, reachability, request_for
from meshward.policy import PolicySet, evaluate, load, parse
from meshward.policy.cases import build_request
from meshward.policy.explain import explain
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Operation,
    Protocol,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)


def workload(name: str, ns: str = "shop", protocol: str = "HTTP") -> str:
    return f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec:
  ports: [{{name: p, port: 8080, protocol: {protocol}}}]
"""


def policy(name: str, app: str, action: str, rules: str, annotations: str = "") -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {name}
  namespace: shop
  annotations: {{{annotations}}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: {action}
  rules: {rules}
"""


# Every feature probes have to cover: negations, templates, suffixes, DENY over ALLOW,
# dry-run, an expired emergency allow (keeps the default deny), CUSTOM (fail closed), TCP,
# a namespace-wide source, a workload no policy selects, a `when` rule (conditional).
MESH = (
    "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
    "spec: {trustDomain: cluster.local, rootNamespace: meshward-system}\n"
    + "".join(workload(n) for n in ("web", "api", "db", "open", "admin", "batch"))
    + workload("db2", protocol="TCP")
    + workload("ext", ns="partner")
    + policy(
        "api-allow",
        "api",
        "ALLOW",
        """
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
      to: [{operation: {methods: ["GET", "POST"], paths: ["/items/{*}", "/items"]}}]
    - from: [{source: {namespaces: ["partner"]}}]
      to: [{operation: {notMethods: ["DELETE"], paths: ["*.json"]}}]
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/batch"]}}]
      to: [{operation: {notPaths: ["/admin/*"]}}]
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/admin"]}}]
      when: [{key: "request.headers[x-ticket]", values: ["*"]}]""",
    )
    + policy(
        "api-deny",
        "api",
        "DENY",
        """
    - to: [{operation: {paths: ["/items/secret"]}}]""",
    )
    + policy(
        "db-allow",
        "db",
        "ALLOW",
        """
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/api"]}}]""",
    )
    + policy(
        "db-dry",
        "db",
        "DENY",
        """
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/api"]}}]""",
        '"istio.io/dry-run": "true"',
    )
    + policy(
        "db2-allow",
        "db2",
        "ALLOW",
        """
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/db"]}}]
      to: [{operation: {ports: ["8080"]}}]""",
    )
    + policy(
        "admin-expired",
        "admin",
        "ALLOW",
        """
    - {}""",
        '"meshward.dev/expires-at": "2026-01-01T00:00:00Z"',
    )
    + policy(
        "batch-emergency",
        "batch",
        "ALLOW",
        """
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]""",
        '"meshward.dev/expires-at": "2099-01-01T00:00:00Z"',
    )
)


def mesh() -> PolicySet:
    return parse({"mesh.yaml": MESH})


def assert_matches_explain(policy_set: PolicySet, now: datetime) -> int:
    """For every ordered pair and every probe of the callee: explain's decision equals what
    the reachability says. Returns the number of comparisons."""
    result = reachability(policy_set, now=now)
    compared = 0
    for callee in policy_set.workloads:
        for caller in policy_set.workloads:
            if caller.ref == callee.ref:
                continue
            edge = result.edges.get((caller.ref, callee.ref))
            allowed = {(p.port, p.method, p.path, p.host) for p in edge.allowed} if edge else set()
            for probe in result.probes[callee.ref]:
                # the request `meshward policy explain --source-workload ... --workload ...` builds
                _, request = build_request(
                    policy_set,
                    destination=callee.ref,
                    source=caller.ref,
                    method=probe.method or "GET",
                    path=probe.path or "/",
                    port=probe.port,
                    host=probe.host or None,
                )
                assert request == request_for(policy_set, caller, callee, probe)
                verdict = explain(policy_set, callee, request, now=now).decision.allowed
                assert verdict == ((probe.port, probe.method, probe.path, probe.host) in allowed), (
                    caller.ref,
                    callee.ref,
                    probe,
                )
                compared += 1
    return compared


def test_examples_match_explain_on_every_pair() -> None:
    policy_set = load([EXAMPLES])
    assert assert_matches_explain(policy_set, NOW) > 20 * 4
    # and after the emergency allow expires, the frontend no longer reaches inventory
    later = reachability(policy_set, now=datetime(2100, 1, 1, tzinfo=UTC))
    assert ("shop/frontend", "shop/inventory") in reachability(policy_set, now=NOW).edges
    assert ("shop/frontend", "shop/inventory") not in later.edges


def test_every_feature_matches_explain_on_every_pair() -> None:
    assert assert_matches_explain(mesh(), NOW) > 50


def test_what_each_edge_says() -> None:
    result = reachability(mesh(), now=NOW)
    web_api = result.edges[("shop/web", "shop/api")]
    assert web_api.access() == [
        {"port": 8080, "methods": ["GET", "POST"], "paths": ["/items", "/items/{*}"]}
    ]
    assert web_api.rules == ("shop/api-allow#0",)
    partner = result.edges[("partner/ext", "shop/api")]
    methods = partner.access()[0]["methods"]
    assert "DELETE" not in methods and OTHER in methods  # notMethods: any other method
    assert partner.access()[0]["paths"] == ["*.json"]
    batch = result.edges[("shop/batch", "shop/api")]
    assert all("/admin/*" not in g["paths"] for g in batch.access())
    assert any(OTHER in g["paths"] for g in batch.access())
    assert ("shop/admin", "shop/api") not in result.edges  # only with a header
    assert result.conditional_rules["shop/api"] == ("shop/api-allow#3",)
    # no policy selects shop/open: everyone may do anything, one probe each
    open_edge = result.edges[("shop/web", "shop/open")]
    assert open_edge.everything and open_edge.rules == ("",) and open_edge.probes == 1
    assert open_edge.summary() == "anything"
    # the dry-run DENY does not take api's access to db away
    assert result.edges[("shop/api", "shop/db")].everything
    # an expired emergency ALLOW keeps the default deny: nobody reaches admin
    assert not any(dst == "shop/admin" for _, dst in result.edges)
    # one in force opens the door while it lasts
    assert ("shop/web", "shop/batch") in result.edges
    # TCP: one connection probe, allowed by a port-only rule
    tcp = result.edges[("shop/db", "shop/db2")]
    assert tcp.probes == 1 and tcp.allowed[0].method == ""
    assert set(result.graph["shop/web"]) >= {"shop/api", "shop/open", "shop/batch"}


def test_blast_radius_of_the_feature_mesh() -> None:
    radius = blast_radius(reachability(mesh(), now=NOW).graph)
    # web -> api -> db -> db2: transitively web reaches all three
    assert {"shop/api", "shop/db", "shop/db2"} <= set(radius["shop/web"]["transitive"])
    assert "shop/db" not in radius["shop/web"]["direct"]
    assert radius["shop/admin"]["transitive_count"] == len(radius["shop/admin"]["transitive"])


def closure(nodes: list[str], edges: set[tuple[str, str]]) -> dict[str, set[str]]:
    """Warshall's algorithm: an oracle independent of the BFS under test."""
    index = {n: i for i, n in enumerate(nodes)}
    m = [[False] * len(nodes) for _ in nodes]
    for a, b in edges:
        m[index[a]][index[b]] = True
    for k in range(len(nodes)):
        for i in range(len(nodes)):
            if m[i][k]:
                for j in range(len(nodes)):
                    m[i][j] = m[i][j] or m[k][j]
    return {n: {nodes[j] for j in range(len(nodes)) if m[index[n]][j] and j != index[n]}
            for n in nodes}  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=12).flatmap(
        lambda n: st.tuples(
            st.just([f"ns/w{i}" for i in range(n)]),
            st.sets(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=n * n),
        )
    )
)
def test_blast_radius_is_the_transitive_closure(
    graph: tuple[list[str], set[tuple[int, int]]],
) -> None:
    nodes, pairs = graph
    edges = {(nodes[a], nodes[b]) for a, b in pairs}
    adjacency: dict[str, set[str]] = {n: set() for n in nodes}
    for a, b in edges:
        adjacency[a].add(b)
    radius = blast_radius(adjacency)
    expected = closure(nodes, edges)
    for n in nodes:
        assert set(radius[n]["transitive"]) == expected[n]
        assert set(radius[n]["direct"]) == {b for a, b in edges if a == n and b != n}
        assert radius[n]["transitive_count"] == len(expected[n])
        assert set(radius[n]["direct"]) <= set(radius[n]["transitive"])


def test_too_many_workloads_is_said_not_computed() -> None:
    text = "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n"
    text += "".join(workload(f"w{i}") for i in range(12))
    result = reachability(parse({"m.yaml": text}), now=NOW, max_workloads=10)
    assert result.skipped.startswith("12 workloads") and not result.edges
    assert result.evaluations == 0


def test_probes_per_port_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = ", ".join(f'"/p{i}"' for i in range(300))
    text = (
        "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {}\n"
        + workload("a")
        + workload("b")
        + policy("b", "b", "ALLOW", f"""
    - to: [{{operation: {{methods: ["GET", "PUT"], paths: [{paths}]}}}}]""")
    )  # fmt: skip
    policy_set = parse({"m.yaml": text})
    callee = policy_set.workload("shop/b")
    assert callee is not None
    probes, cut = probes_for(policy_set, callee)
    assert len(probes) == 3 * 301 and cut == 0
    monkeypatch.setattr(reach, "MAX_PROBES", 100)
    probes, cut = probes_for(policy_set, callee)
    assert len(probes) == 100 and cut == 3 * 301 - 100
    assert reachability(policy_set, now=NOW).cut_probes == cut


# --------------------------------------------------------------------------- soundness

NAMES = ("w0", "w1", "w2", "w3")
PATTERNS = ("/api/*", "/api/v1", "*.json", "/items/{*}", "/admin", "/x", "*")
PATHS = ("/api/v1", "/api/v2.json", "/api/z", "/items/7", "/items/7.json", "/admin", "/x",
         "/y.json", "/", "/other")  # fmt: skip
HOSTS = ("w1", "api.example", "*.example")
METHODS = ("GET", "POST", "DELETE")


def _subset(items: tuple[str, ...]) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(items), max_size=2, unique=True).map(tuple)


def _principal(name: str) -> str:
    return f"cluster.local/ns/{'a' if name in ('w0', 'w1') else 'b'}/sa/{name}"


rules = st.builds(
    Rule,
    sources=st.lists(
        st.builds(
            Source,
            principals=_subset(NAMES).map(lambda t: tuple(_principal(n) for n in t)),
            not_principals=_subset(NAMES).map(lambda t: tuple(_principal(n) for n in t)),
            namespaces=_subset(("a", "b")),
        ),
        max_size=1,
    ).map(tuple),
    operations=st.lists(
        st.builds(
            Operation,
            methods=_subset(METHODS),
            not_methods=_subset(METHODS),
            paths=_subset(PATTERNS),
            not_paths=_subset(PATTERNS),
            hosts=st.one_of(st.just(()), _subset(HOSTS)),
        ),
        max_size=1,
    ).map(tuple),
)
policies = st.lists(
    st.builds(
        lambda i, action, app, dry, rs: AuthorizationPolicy(
            namespace="a" if app in ("w0", "w1", None) else "b",
            name=f"p{i}",
            action=action,
            selector=None if app is None else {"app": app},
            rules=tuple(rs),
            dry_run=dry,
        ),
        st.integers(0, 10**6),
        st.sampled_from((Action.ALLOW, Action.DENY)),
        st.one_of(st.none(), st.sampled_from(NAMES)),
        st.booleans(),
        st.lists(rules, max_size=2),
    ),
    max_size=4,
    unique_by=lambda p: p.name,
)
TRIES = [
    (src, dst, method, path, host)
    for src in NAMES
    for dst in NAMES
    if src != dst
    for method in (*METHODS, "PUT")
    for path in PATHS
    for host in ("", "api.example", "x.example", "zzz")
]


@settings(max_examples=80, deadline=None)
@given(policies)
def test_no_request_is_allowed_that_reachability_misses(aps: list[AuthorizationPolicy]) -> None:
    """Soundness: for random policies and every request of a grid wider than the probes
    (methods, paths and Hosts no rule names, paths matching several patterns), a request the evaluator allows is never between workloads the reachability says
    cannot connect, and its method is among those reported for the pair."""
    workloads = [
        Workload(namespace="a" if n in ("w0", "w1") else "b", name=n, labels={"app": n},
                 ports=(WorkloadPort("http", 8080, Protocol.HTTP),))
        for n in NAMES
    ]  # fmt: skip
    policy_set = PolicySet.create(workloads=workloads, authorization_policies=aps)
    result = reachability(policy_set, now=NOW)
    by_name = {w.name: w for w in policy_set.workloads}
    for src, dst, method, path, host in TRIES:
        caller, callee = by_name[src], by_name[dst]
        probe = reach.Probe(8080, method, path, OTHER, OTHER, host)
        request = request_for(policy_set, caller, callee, probe)
        if not evaluate(policy_set, callee, request, now=NOW).allowed:
            continue
        edge = result.edges.get((caller.ref, callee.ref))
        assert edge is not None, (caller.ref, callee.ref, method, path, host)
        reported = {m for g in edge.access() for m in g["methods"]}
        assert method in reported or OTHER in reported, (reported, method)
