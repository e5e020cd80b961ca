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

    raw = compiler_for(CompileOptions(), agent_secrets=False)  # the compiler's own ADS form
    messages = list(raw(policy, workload, datetime.now(UTC)))
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


# -- file-based SDS for an operator-run Envoy (meshward.xds.filesds) --------------------------------
def _packed(messages: list[object]) -> dict[str, list[object]]:
    from meshward.xds import typeurls

    by_type: dict[str, list[object]] = {}
    for message in messages:
        resource = make_resource(message)
        by_type.setdefault(resource.type_url, []).append(resource)
    assert by_type.get(typeurls.LISTENER) and by_type.get(typeurls.CLUSTER)
    return by_type


def test_files_node_gets_its_tls_contexts_pointed_at_its_files() -> None:
    from datetime import UTC, datetime

    from meshward.xds import typeurls
    from meshward.xds.filesds import FilesSdsRewriter

    policy = parse({"mesh.yaml": POLICY})
    workload = policy.workload("shop/frontend")
    assert workload is not None
    packed = _packed(list(compiler_for(CompileOptions())(policy, workload, datetime.now(UTC))))
    rewriter = FilesSdsRewriter()
    out = rewriter.rewrite(packed, "/etc/meshward/frontend.shop")  # type: ignore[arg-type]
    found = []
    for type_url in (typeurls.LISTENER, typeurls.CLUSTER):
        for resource in out[type_url]:
            message = (listener_pb2.Listener if type_url == typeurls.LISTENER
                       else cluster_pb2.Cluster)()  # fmt: skip
            resource.body.Unpack(message)  # type: ignore[attr-defined]
            found.extend(sds_configs(message))
            assert resource.secrets == frozenset()  # nothing the snapshot must hold
    assert found
    for config in found:
        source = config["sds_config"]["path_config_source"]  # type: ignore[index]
        name = config["name"]
        expected = {"default": "sds-default.json", "ROOTCA": "sds-rootca.json"}[name]  # type: ignore[index]
        assert source == {"path": f"/etc/meshward/frontend.shop/{expected}",
                          "watched_directory": {"path": "/etc/meshward/frontend.shop"}}  # fmt: skip
    # Memoized: the same content in, the same Resource out (same versions for the node).
    again = rewriter.rewrite(packed, "/etc/meshward/frontend.shop")  # type: ignore[arg-type]
    assert all(
        a is b for a, b in zip(out[typeurls.LISTENER], again[typeurls.LISTENER], strict=True)
    )


def test_files_rewrite_memo_is_bounded_under_a_flood_of_directories() -> None:
    from datetime import UTC, datetime

    from meshward.xds.filesds import FilesSdsRewriter

    policy = parse({"mesh.yaml": POLICY})
    workload = policy.workload("shop/frontend")
    assert workload is not None
    packed = _packed(list(compiler_for(CompileOptions())(policy, workload, datetime.now(UTC))))
    rewriter = FilesSdsRewriter(max_entries=10)
    for i in range(300):
        rewriter.rewrite(packed, f"/srv/n{i}")  # type: ignore[arg-type]
    assert len(rewriter) <= 10


def test_secrets_dir_metadata_is_checked() -> None:
    import pytest
    from envoy.config.core.v3 import base_pb2

    from meshward.xds.filesds import METADATA_SECRETS_DIR, secrets_dir_of

    def node(value: object) -> object:
        n = base_pb2.Node(id="shop/orders")
        n.metadata.update({METADATA_SECRETS_DIR: value})
        return n

    assert secrets_dir_of(None) is None
    assert secrets_dir_of(base_pb2.Node(id="shop/orders")) is None  # an agent's node
    assert secrets_dir_of(node("/etc/meshward/orders.shop/")) == "/etc/meshward/orders.shop"
    for bad in ("relative/dir", "/a/../etc", "/a b", "/x\n", "/" + "a" * 600, 5, ""):
        with pytest.raises(ValueError, match="secrets-dir"):
            secrets_dir_of(node(bad))
