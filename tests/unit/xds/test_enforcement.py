"""NOT ENFORCED records stay bounded and name what matters."""

from __future__ import annotations

from meshward.policy import parse
from meshward.xds.enforcement import MAX_DOCUMENTS, compile_failure, documents

WORKLOAD = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {ports: [{port: 8080}]}
"""


def policy(i: int) -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p{i:03d}, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  rules: [{{to: [{{operation: {{paths: ["/p{i}"]}}}}]}}]
"""


def test_documents_are_bounded_and_name_their_file() -> None:
    ps = parse({"w.yaml": WORKLOAD, "p.yaml": "".join(policy(i) for i in range(500))})
    listed = documents(ps, "shop/api")
    assert len(listed) == MAX_DOCUMENTS + 1
    assert listed[0] == "AuthorizationPolicy shop/p000 (p.yaml#1)"
    assert listed[-1] == f"... and {500 - MAX_DOCUMENTS} more"
    assert documents(ps, "shop/unknown") == []


def test_compile_failure_record() -> None:
    record = compile_failure("ValueError: too big")
    assert record["error"] == "compile error: ValueError: too big" and record["resources"] == []
