"""PolicySet lookups: workloads by ref, policies per workload, resolved mTLS mode, JWT rules."""

from __future__ import annotations

from meshward.policy import MtlsMode, PolicySet, parse

WORKLOADS = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {ports: [{port: 8080}, {port: 9090}]}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {ports: [{port: 5432, protocol: TCP}]}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: tool, namespace: ops, labels: {app: api}}
"""


def pa(name: str, namespace: str, spec: str) -> str:
    return (
        f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}"
    )


def load(*docs: str) -> PolicySet:
    return parse({"w.yaml": WORKLOADS, "x.yaml": "\n---\n".join(docs)})


def test_workload_lookup() -> None:
    ps = load()
    api = ps.workload("shop/api")
    assert api is not None and api.ref == "shop/api"
    assert api.spiffe_id("cluster.local") == "spiffe://cluster.local/ns/shop/sa/api"
    assert ps.workload("shop/nope") is None
    assert [w.ref for w in ps.workloads] == ["ops/tool", "shop/api", "shop/db"]


def test_mtls_mode_precedence() -> None:
    ps = load()
    api, db, tool = (ps.workload(r) for r in ("shop/api", "shop/db", "ops/tool"))
    assert api and db and tool
    assert ps.mtls_mode(api, 8080) is MtlsMode.PERMISSIVE  # nothing set
    ps = load(pa("mesh", "meshward-system", "  mtls: {mode: STRICT}\n"))
    assert ps.mtls_mode(tool, 1) is MtlsMode.STRICT  # mesh-wide
    ps = load(
        pa("mesh", "meshward-system", "  mtls: {mode: STRICT}\n"),
        pa("ns", "shop", "  mtls: {mode: PERMISSIVE}\n"),
        pa(
            "api",
            "shop",
            "  selector: {matchLabels: {app: api}}\n  mtls: {mode: DISABLE}\n"
            "  portLevelMtls: {9090: {mode: STRICT}}\n",
        ),
        pa(
            "db",
            "shop",
            "  selector: {matchLabels: {app: db}}\n  portLevelMtls: {5432: {mode: STRICT}}\n",
        ),
    )
    api, db, tool = (ps.workload(r) for r in ("shop/api", "shop/db", "ops/tool"))
    assert api and db and tool
    assert ps.mtls_mode(api, 9090) is MtlsMode.STRICT  # port level
    assert ps.mtls_mode(api, 8080) is MtlsMode.DISABLE  # workload selector
    assert ps.mtls_mode(db, 5432) is MtlsMode.STRICT
    assert ps.mtls_mode(db, 1) is MtlsMode.PERMISSIVE  # selector PA with UNSET mode: namespace
    assert ps.mtls_mode(tool, 1) is MtlsMode.STRICT  # other namespace: mesh-wide
    # an UNSET namespace policy inherits from the mesh
    ps = load(pa("mesh", "meshward-system", "  mtls: {mode: STRICT}\n"), pa("ns", "shop", "  {}\n"))
    api = ps.workload("shop/api")
    assert api is not None and ps.mtls_mode(api, 8080) is MtlsMode.STRICT
    assert all(ps.mtls_mode(w, 1) is not MtlsMode.UNSET for w in ps.workloads)


def test_request_authentications_for() -> None:
    ra = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}"
        "  jwtRules: [{{issuer: 'https://{name}.example', jwksUri: 'https://{name}.example/k'}}]\n"
    )
    ps = load(
        ra.format(name="api", ns="shop", sel="  selector: {matchLabels: {app: api}}\n"),
        ra.format(name="shop-wide", ns="shop", sel=""),
        ra.format(name="mesh", ns="meshward-system", sel=""),
        ra.format(name="elsewhere", ns="ops", sel=""),
    )
    api, db, tool = (ps.workload(r) for r in ("shop/api", "shop/db", "ops/tool"))
    assert api and db and tool
    assert [r.name for r in ps.request_authentications_for(api)] == ["mesh", "api", "shop-wide"]
    assert [r.name for r in ps.request_authentications_for(db)] == ["mesh", "shop-wide"]
    assert [r.name for r in ps.request_authentications_for(tool)] == ["mesh", "elsewhere"]


def test_policies_for_is_sorted_and_scoped() -> None:
    ap = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{sel}  action: ALLOW\n"
    )
    ps = load(
        ap.format(name="z", ns="shop", sel=""),
        ap.format(name="a", ns="shop", sel="  selector: {matchLabels: {app: api}}\n"),
        ap.format(name="m", ns="meshward-system", sel="  selector: {matchLabels: {app: api}}\n"),
        ap.format(name="db", ns="shop", sel="  selector: {matchLabels: {app: db}}\n"),
    )
    api, tool = ps.workload("shop/api"), ps.workload("ops/tool")
    assert api and tool
    assert [p.ref for p in ps.policies_for(api)] == ["meshward-system/m", "shop/a", "shop/z"]
    assert [p.ref for p in ps.policies_for(tool)] == ["meshward-system/m"]


def test_policy_sets_compare_by_content_not_origin() -> None:
    a = load()
    b = parse({"other-name.yaml": WORKLOADS})
    assert a == b and a.version == b.version
    assert a.workloads[0].origin != b.workloads[0].origin
