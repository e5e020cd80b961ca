"""The cold start's transport floor for bench/xds_fleet.py --burst-only: an ADS server that
does nothing a control plane must do, against which the same simulated nodes connect.

It listens as `meshward xds serve` does (gRPC aio, mTLS with the client certificate required and
verified against the mesh roots, the same SPIFFE identity, SO_REUSEPORT off, the same pending-call
limits), and answers each node's subscriptions with responses it encoded before it listened:
the fleet's real resources (compiled here, with the control plane's compiler, before the clock),
each service's per type, its replicas sharing them. Requests that only ACK get nothing. No
compile, no snapshot, no status, no fleet table, no history: what is left of a cold start when the
control plane costs nothing but gRPC itself. Its time and CPU are a floor, not a competitor: a real
control plane cannot go below them on this machine.

    python bench/fleet_floor.py WORK PORT SERVER_IDENTITY READY_FILE
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def encoded_responses(work: Path) -> dict[str, dict[tuple[str, bool], bytes]]:
    """Per service ref, per (type URL, delta): its whole response for that type on the wire."""
    from envoy.service.discovery.v3 import discovery_pb2

    from meshward.compile import CompileOptions
    from meshward.policy.loader import load
    from meshward.xds.compile_adapter import compiler_for
    from meshward.xds.resources import Resource, encode_response, make_resource

    policy = load([work / "policies"])
    options = CompileOptions(access_log_path=None, listen_host="127.0.0.1")
    _, out = compiler_for(options).mesh(policy, datetime.now(UTC), None)
    made: dict[int, Resource] = {}  # shared messages packed once
    table: dict[str, dict[tuple[str, bool], bytes]] = {}
    for ref, messages in out.items():
        if isinstance(messages, str):
            raise SystemExit(f"{ref} does not compile: {messages}")
        by_type: dict[str, list[Resource]] = {}
        for message in messages:
            resource = made.get(id(message)) or made.setdefault(id(message), make_resource(message))
            by_type.setdefault(resource.type_url, []).append(resource)
        table[ref] = {}
        for type_url, resources in by_type.items():
            sotw = discovery_pb2.DiscoveryResponse(version_info="1", type_url=type_url, nonce="1")
            delta = discovery_pb2.DeltaDiscoveryResponse(
                system_version_info="1", type_url=type_url, nonce="1"
            )
            table[ref][type_url, False] = encode_response(sotw, resources, delta=False)
            table[ref][type_url, True] = encode_response(delta, resources, delta=True)
    return table


def measure_floor(
    work: Path, launcher: Any, where: Any, ads: str, processes: int, impl: str = "python"
) -> dict[str, Any]:
    """The same nodes' burst against the floor server (``where``: the ADS port and identity
    the nodes expect), from the moment it listens to every node configured; the CPU both sides
    spent meanwhile (the server's split as bench_server.cpu_by_thread splits it)."""
    from bench.fleet_workers import NodeFleet
    from meshward.testing.bench_server import cpu_by_thread

    ready = work / "floor.ready.json"
    argv = [sys.executable, str(Path(__file__)), str(work), str(where.ads_port),
            where.identity, str(ready)]  # fmt: skip
    launcher.start("floor", argv, ready_path=ready, timeout=900)
    pid = launcher["floor"].pid
    fleet = NodeFleet(work, launcher, where, ads, processes, name="floor-nodes", impl=impl)
    try:
        before, nodes0, start = cpu_by_thread(pid), fleet.cpu_seconds(), time.time()
        connected = fleet.ask("connect retry")
        after = cpu_by_thread(pid)
        return {
            "floor": connected["all_configured_wall"] - start,
            "floor_cpu": {k: round(after[k] - before[k], 2) for k in after},
            "floor_cpu_nodes": fleet.cpu_seconds() - nodes0,
            "floor_failures": connected["failures"],
        }
    finally:
        fleet.stop()
        launcher.stop("floor")


def main(work: Path, port: int, identity: str, ready_file: Path) -> None:
    import grpc
    from envoy.service.discovery.v3 import discovery_pb2

    from meshward.certs import CertificateAuthority
    from meshward.testing.ads_client import DELTA_METHOD, SOTW_METHOD
    from meshward.xds.server import PENDING_CALLS_HARD, PENDING_CALLS_SOFT

    table = encoded_responses(work)
    ca = CertificateAuthority.load(work / "ca")
    svid = ca.issue(identity)

    def ref_of(node_id: str) -> str:
        return "/".join(node_id.split("/")[:2])

    async def sotw(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        context.auth_context()  # as the control plane reads its peer's identity
        answers: dict[tuple[str, bool], bytes] = {}
        sent: dict[str, tuple[str, ...]] = {}
        async for request in requests:
            answers = answers or table.get(ref_of(request.node.id), {})
            names = tuple(request.resource_names)
            if request.response_nonce and sent.get(request.type_url) == names:
                continue  # an ACK
            sent[request.type_url] = names
            yield answers.get((request.type_url, False), b"")

    async def delta(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[bytes]:
        context.auth_context()
        answers: dict[tuple[str, bool], bytes] = {}
        async for request in requests:
            answers = answers or table.get(ref_of(request.node.id), {})
            if request.response_nonce and not request.resource_names_subscribe:
                continue  # an ACK
            yield answers.get((request.type_url, True), b"")

    service, _, sotw_name = SOTW_METHOD.strip("/").partition("/")
    delta_name = DELTA_METHOD.rpartition("/")[2]
    handlers = grpc.method_handlers_generic_handler(service, {
        sotw_name: grpc.stream_stream_rpc_method_handler(
            sotw, request_deserializer=discovery_pb2.DiscoveryRequest.FromString),
        delta_name: grpc.stream_stream_rpc_method_handler(
            delta, request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString),
    })  # fmt: skip

    async def serve() -> None:
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            ("grpc.server.max_pending_requests", PENDING_CALLS_SOFT),
            ("grpc.server.max_pending_requests_hard_limit", PENDING_CALLS_HARD),
        ])  # fmt: skip
        server.add_generic_rpc_handlers((handlers,))
        credentials = grpc.ssl_server_credentials(
            [(svid.private_key_pem, svid.cert_chain_pem)],
            root_certificates=ca.trust_bundle().roots_pem,
            require_client_auth=True,
        )
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
        await server.start()
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ads": port}))
        tmp.replace(ready_file)
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    if len(sys.argv) != 5 or not sys.argv[2].isdigit():
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
