"""`--secrets agent`: compiled TLS contexts fetch their secrets from the node agent's SDS."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from meshward.compile import CompileOptions
from meshward.policy import parse
from meshward.xds.agentsds import SDS_CLUSTER, SecretsFromAgent, secrets_from_agent
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.resources import make_resource

POLICY = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: meshward-system}
spec: {mtls: {mode: STRICT}}
""" + "".join(
    f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
"""
    for name in ("frontend", "orders")
)


def sds_configs(message: object) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            if "sds_config" in value and "name" in value:
                found.append(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(json_format.MessageToDict(message, preserving_proto_field_name=True))  # type: ignore[arg-type]
    return found


def test_every_secret_reference_points_at_the_agent() -> None:
    policy = parse({"mesh.yaml": POLICY})
    workload = policy.workload("shop/frontend")
    assert workload is not None
    from datetime import UTC, datetime

    messages = list(compiler_for(CompileOptions())(policy, workload, datetime.now(UTC)))
    before = [c for m in messages for c in sds_configs(m)]
    assert before and all("ads" in c["sds_config"] for c in before)  # type: ignore[operator]
    after = [c for m in secrets_from_agent(messages) for c in sds_configs(m)]
    assert len(after) == len(before)
    for config in after:
        source = config["sds_config"]["api_config_source"]  # type: ignore[index]
        assert source["grpc_services"] == [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]
    # ...and such references are not snapshot dependencies (the control plane serves no secret).
    for message in secrets_from_agent(messages):
        if isinstance(message, listener_pb2.Listener | cluster_pb2.Cluster):
            assert make_resource(message).secrets == frozenset()
    assert any(make_resource(m).secrets for m in messages)  # the ADS form still depends on them
    # The inputs are untouched (the compiler shares them).
    assert [c for m in messages for c in sds_configs(m)] == before


def test_memo_keeps_shared_objects_shared_and_is_bounded() -> None:
    policy = parse({"mesh.yaml": POLICY})
    workload = policy.workload("shop/frontend")
    assert workload is not None
    from datetime import UTC, datetime

    messages = list(compiler_for(CompileOptions())(policy, workload, datetime.now(UTC)))
    rewrite = SecretsFromAgent(max_entries=3)
    first, second = rewrite(messages), rewrite(messages)
    tls = [
        i
        for i, m in enumerate(messages)
        if isinstance(m, listener_pb2.Listener | cluster_pb2.Cluster)
    ]
    assert len(rewrite) <= 3
    if len(tls) <= 3:
        assert all(first[i] is second[i] for i in tls)
    small = SecretsFromAgent()
    a, b = small(messages), small(messages)
    assert all(x is y for x, y in zip(a, b, strict=True))  # same object in, same object out
