"""The canonical YAML is written by libyaml's emitter (where PyYAML has it): the same text as
PyYAML's own emitter, and read back to the same version, for awkward values too."""

from __future__ import annotations

import yaml

from meshward.policy import canonical, parse

AWKWARD = [
    "/api/ünïcödé/日本語", "/a: b # not a comment", "'quoted'", '"double"', " leading space",
    "trailing space ", "x" * 200, "/very/long/" + "segment/" * 30, "multi\nline", "tab\there",
    "*", "/{*}/x", "null", "yes", "0123", "1e3", "- dash", "@at", "`tick`", "\u2028sep",
]  # fmt: skip


def _policy(paths: list[str]) -> str:
    items = ", ".join(yaml.safe_dump(p, default_style='"').strip() for p in paths)
    return f"""
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: orders, namespace: shop, labels: {{app: orders, note: "ä: #x"}}}}
spec: {{ports: [{{name: http, port: 8080}}]}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  rules: [{{to: [{{operation: {{paths: [{items}]}}}}]}}]
"""


def test_libyaml_writes_what_pyyaml_writes_and_it_reads_back() -> None:
    ps = parse({"p.yaml": _policy([p if p.startswith("/") else "/" + p for p in AWKWARD])})
    docs = ps.canonical_documents()
    text = canonical.dump_documents(docs)
    python = yaml.dump_all(docs, Dumper=yaml.SafeDumper, sort_keys=False,
                           default_flow_style=False, allow_unicode=True)  # fmt: skip
    assert text == python
    assert parse({"again.yaml": text}).version == ps.version
