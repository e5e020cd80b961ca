"""The control plane over real gRPC and mTLS with simulated ADS clients (no Envoy): status,
metrics, pushes to affected nodes only, NACK redaction, drift, expires-at re-pushes."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context
from meshward.compile import CompileOptions
from meshward.policy import parse
from meshward.testing.ads_client import AdsClient
from meshward.testing.topology import workloads_yaml
from meshward.xds import status_cli, typeurls
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsService

WORKLOADS = workloads_yaml(["frontend", "orders", "payments"])
ORDERS_POLICY = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop%s}
spec:
  selector: {matchLabels: {app: orders}}
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
      to: [{operation: {methods: [%s]}}]
"""
# Nodes bring their own SVID: over SDS the control plane serves the public trust bundle only.
ALL_TYPES = {typeurls.CLUSTER: (), typeurls.LISTENER: (), typeurls.SECRET: ("ROOTCA",)}


def policy(methods: str = '"GET"', annotations: str = "") -> Any:
    return parse({"mesh.yaml": WORKLOADS + ORDERS_POLICY % (annotations, methods)})


def with_routes(ref: str) -> dict[str, tuple[str, ...]]:
    """ALL_TYPES plus the node's route configs (RDS is not a wildcard type: Envoy asks for the
    names its listeners use, and so do these clients)."""
    from meshward.compile import compile_workload

    routes = tuple(r.name for r in compile_workload(policy(), ref).routes)
    return {**ALL_TYPES, typeurls.ROUTE: routes}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral("cluster.local")


@pytest.fixture
async def service(ca: CertificateAuthority) -> AsyncIterator[XdsService]:
    svc = XdsService(policy(), ca, compiler_for(CompileOptions()), drift_threshold=0.3)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


class Clients:
    def __init__(self, service: XdsService, ca: CertificateAuthority) -> None:
        self.service, self.ca = service, ca
        self.tasks: list[asyncio.Task[None]] = []

    def open(self, node: str, *, delta: bool = False, **kwargs: Any) -> AdsClient:
        namespace, name = node.split("/")[:2]
        svid = self.ca.issue(f"spiffe://cluster.local/ns/{namespace}/sa/{name}")
        client = AdsClient(
            "127.0.0.1",
            self.service.port or 0,
            node,
            client_ssl_context(
                svid.cert_chain_pem, svid.private_key_pem, self.ca.trust_bundle().roots_pem
            ),
            server_identity=self.service.server_identity,
            delta=delta,
            subscriptions=dict(kwargs.pop("subscriptions", ALL_TYPES)),
            **kwargs,
        )
        self.tasks.append(asyncio.create_task(client.run()))
        return client

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def clients(service: XdsService, ca: CertificateAuthority) -> AsyncIterator[Clients]:
    pool = Clients(service, ca)
    try:
        yield pool
    finally:
        await pool.close()


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "it") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def node(service: XdsService, name: str) -> dict[str, Any]:
    return next(n for n in service.status()["nodes"] if n["node"] == name)


def in_sync(service: XdsService, name: str) -> bool:
    try:
        entry = node(service, name)
    except StopIteration:
        return False
    types_ = [t for s in entry["streams"] for t in s["types"]]
    return entry["connected"] and len(types_) >= 3 and all(t["in_sync"] for t in types_)


async def http_get(url: str) -> tuple[int, bytes]:
    def get() -> tuple[int, bytes]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()

    return await asyncio.to_thread(get)


async def test_status_and_metrics_endpoints(service: XdsService, clients: Clients) -> None:
    clients.open("shop/frontend")
    await until(lambda: in_sync(service, "shop/frontend"), what="sync")
    code, body = await http_get(f"{service.admin_url}/status?view=nodes")
    status = json.loads(body)
    assert code == 200
    entry = next(n for n in status["nodes"] if n["node"] == "shop/frontend")
    assert "certificate" not in entry  # the control plane made none: the node brought its own
    assert entry["secrets"] == {"source": "agent"}
    assert {t["type"] for t in entry["streams"][0]["types"]} >= {"CDS", "LDS", "SDS"}
    assert entry["streams"][0]["ads_credentials"]["state"] == "ok"
    assert entry["ads_credentials_warning"] is None
    assert "PRIVATE KEY" not in body.decode()
    code, metrics = await http_get(f"{service.admin_url}/metrics")
    text = metrics.decode()
    assert "meshward_xds_connected_nodes 1.0" in text
    assert 'meshward_xds_pushes_total{type="LDS"}' in text
    assert "meshward_xds_push_latency_seconds_bucket" in text
    # The node's credential expiry is the notAfter of the client certificate its ADS stream
    # presented, the one /status shows; the control plane holds no node SVID of its own.
    not_after = datetime.fromisoformat(entry["streams"][0]["ads_credentials"]["not_after"])
    expiry = _samples(text)[
        'meshward_xds_node_credential_expiry_timestamp_seconds{node="shop/frontend"}'
    ]
    assert expiry == not_after.timestamp() > datetime.now(UTC).timestamp()
    assert "meshward_xds_cert_expiry_seconds" not in text  # the old always-empty gauge is gone
    # `meshward status` shows the same expiry in CERT EXPIRES, and says when it has passed.
    row = status_cli.render(status, now=not_after - timedelta(minutes=59, seconds=35))
    assert re.search(r"^shop/frontend .* in 59m35s +ok +SYNCED$", row, re.M), row
    late = status_cli.render(status, now=not_after + timedelta(seconds=90))
    assert re.search(r"^shop/frontend .* EXPIRED 1m30s ago ", late, re.M), late


async def test_a_change_pushes_to_the_affected_workload_only(
    service: XdsService, clients: Clients
) -> None:
    nodes = ["shop/frontend", "shop/orders", "shop/orders/2", "shop/payments"]
    opened = {
        name: clients.open(
            name,
            delta=name == "shop/orders/2",
            subscriptions=with_routes("/".join(name.split("/")[:2])),
        )
        for name in nodes
    }
    await until(lambda: all(in_sync(service, n) for n in nodes), what="initial sync")
    before = {n: {t: v.responses for t, v in c.views.items()} for n, c in opened.items()}
    changed = service.control.apply_policy(policy('"GET", "POST"'))
    assert changed == {"shop/orders"}
    # A rule edit is a route config change: RDS is pushed, the listeners are not.
    await until(
        lambda: all(
            opened[n].views[typeurls.ROUTE].responses > before[n][typeurls.ROUTE]
            for n in ("shop/orders", "shop/orders/2")
        ),
        what="the RDS push to orders",
    )
    await until(lambda: all(in_sync(service, n) for n in nodes), what="sync")
    for name in ("shop/orders", "shop/orders/2"):
        views = opened[name].views
        assert views[typeurls.LISTENER].responses == before[name][typeurls.LISTENER], name
    for name in ("shop/frontend", "shop/payments"):
        after = {t: v.responses for t, v in opened[name].views.items()}
        assert after == before[name], name


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_a_client_following_routes_gets_rule_edits_over_rds(
    service: XdsService, clients: Clients, delta: bool
) -> None:
    """Like Envoy, a client with follow_routes asks for the route configs its listeners name;
    a rule edit then reaches it as an RDS push, and so does the first DENY policy (every
    inbound chain has the same RBAC filters: the listener does not change)."""
    client = clients.open("shop/orders", delta=delta, follow_routes=True)
    inbound = "inbound|8080|orders.shop"
    await until(lambda: inbound in client.view(typeurls.ROUTE).resources, what="the inbound route")
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    routes, listeners = (
        client.view(typeurls.ROUTE).responses,
        client.view(typeurls.LISTENER).responses,
    )
    service.control.apply_policy(policy('"PUT"'))
    await until(lambda: client.view(typeurls.ROUTE).responses > routes, what="the RDS push")
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    assert client.view(typeurls.LISTENER).responses == listeners
    deny = parse(
        {
            "mesh.yaml": WORKLOADS
            + ORDERS_POLICY % ("", '"PUT"')
            + "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: no-admin, namespace: shop}\n"
            "spec: {selector: {matchLabels: {app: orders}}, action: DENY, "
            'rules: [{to: [{operation: {paths: ["/admin"]}}]}]}\n'
        }
    )
    routes = client.view(typeurls.ROUTE).responses
    service.control.apply_policy(deny)
    await until(lambda: client.view(typeurls.ROUTE).responses > routes, what="the RDS push")
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    assert client.view(typeurls.LISTENER).responses == listeners
    assert inbound in client.subscriptions[typeurls.ROUTE]


async def test_secret_nack_is_redacted_everywhere(
    service: XdsService, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="meshward")

    def nack(type_url: str, response: Any) -> str | None:
        if type_url != typeurls.SECRET:
            return None
        return 'Proto constraint validation failed: name: "default" private_key { inline_bytes: "-----BEGIN PRIVATE KEY-----\\nMIGHAgEAMBMG\\n-----END PRIVATE KEY-----" }'

    clients.open("shop/payments", nack=nack)
    await until(
        lambda: (
            any(
                t["last_nack"]
                for s in node(service, "shop/payments")["streams"]
                for t in s["types"]
            )
            if any(n["node"] == "shop/payments" for n in service.status()["nodes"])
            else False
        ),
        what="the NACK",
    )
    sds = next(
        t for t in node(service, "shop/payments")["streams"][0]["types"] if t["type"] == "SDS"
    )
    assert "MIGHAg" not in json.dumps(sds) and "redacted Secret NACK" in sds["last_nack"]["error"]
    assert not any("MIGHAg" in r.getMessage() for r in caplog.records)
    assert any("NACK SDS" in r.getMessage() for r in caplog.records)


async def test_drift_is_flagged_and_fails_the_status_command(
    service: XdsService, clients: Clients, capsys: pytest.CaptureFixture[str]
) -> None:
    reject = {"on": False}

    def nack(type_url: str, response: Any) -> str | None:
        if reject["on"] and type_url == typeurls.ROUTE:
            # What Envoy says for a route config it rejects (it names no resource).
            return "Didn't find a registered implementation for 'x' with type URL: 'y'"
        return None

    clients.open("shop/orders", nack=nack, subscriptions=with_routes("shop/orders"))
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    args = argparse.Namespace(xds=service.admin_url, node=None, json=False, timeout=5.0)
    assert await asyncio.to_thread(status_cli.run, args) == 0
    reject["on"] = True
    service.control.apply_policy(policy('"DELETE"'))
    await until(lambda: node(service, "shop/orders")["drift"], what="drift")
    assert await asyncio.to_thread(status_cli.run, args) == 1
    out = capsys.readouterr().out
    assert "NOT ENFORCED" in out and "NACK" in out and "inbound|8080|orders.shop" in out
    assert node(service, "shop/orders")["drift"]
    _, metrics = await http_get(f"{service.admin_url}/metrics")
    assert "meshward_xds_drifting_nodes 1.0" in metrics.decode()
    assert 'meshward_xds_nacks_total{type="RDS"} 1.0' in metrics.decode()
    assert "meshward_xds_drift_events_total 1.0" in metrics.decode()
    assert 'meshward_xds_node_in_sync{node="shop/orders"} 0.0' in metrics.decode()
    assert 'meshward_xds_node_policy_enforced{node="shop/orders"} 0.0' in metrics.decode()
    assert "meshward_xds_policy_rollout_pending 1.0" in metrics.decode()  # never ACKed
    # The ADS port works as --xds too: the admin endpoint is looked up at port + 1.
    host_port = service.admin_url.removeprefix("http://") if service.admin_url else ""
    host, port = host_port.rsplit(":", 1)
    found = await asyncio.to_thread(status_cli.fetch_status, f"{host}:{int(port) - 1}")
    assert found["ads"]["address"] == service.address


async def test_a_nack_is_reported_as_not_enforced_until_a_clean_version_is_acked(
    service: XdsService,
    clients: Clients,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Applied means enforced: the moment a node NACKs the route carrying a policy change,
    status says NOT ENFORCED (naming the policy documents), exits 1, the metric counts the node
    and the NACK is an error log line; a later edit without the bad content clears it."""
    caplog.set_level(logging.INFO, logger="meshward")
    bad = {"methods": '"DELETE"'}

    def nack(type_url: str, response: Any) -> str | None:
        if type_url == typeurls.ROUTE and any(
            bad["methods"].strip('"') in bytes(r.value).decode("latin-1")
            for r in response.resources
        ):
            return "Didn't find a registered implementation for 'x' with type URL: 'y'"
        return None

    clients.open("shop/orders", nack=nack, subscriptions=with_routes("shop/orders"))
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    service.control.apply_policy(policy('"DELETE"'))
    await until(lambda: node(service, "shop/orders")["policy_enforced"] is False, what="NACK")
    entry = node(service, "shop/orders")
    assert entry["not_enforced"]["resources"] == ["inbound|8080|orders.shop"]
    assert entry["not_enforced"]["types"] == ["RDS"]
    assert any("shop/orders-allow-frontend" in p for p in entry["not_enforced"]["policies"])
    args = argparse.Namespace(xds=service.admin_url, node=None, json=False, timeout=5.0)
    assert await asyncio.to_thread(status_cli.run, args) == 1
    out = capsys.readouterr().out
    assert "NOT ENFORCED" in out and "policy documents involved" in out
    _, metrics = await http_get(f"{service.admin_url}/metrics")
    assert "meshward_xds_nodes_not_enforcing 1.0" in metrics.decode()
    assert any(
        r.levelno == logging.ERROR and "NOT ENFORCED" in r.getMessage() for r in caplog.records
    )
    # The bad content goes away with the next edit: that edit is enforced (not held back).
    service.control.apply_policy(policy('"PUT"'))
    await until(lambda: node(service, "shop/orders")["policy_enforced"], what="enforced again")
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    assert await asyncio.to_thread(status_cli.run, args) == 0
    _, metrics = await http_get(f"{service.admin_url}/metrics")
    assert "meshward_xds_nodes_not_enforcing 0.0" in metrics.decode()


async def test_a_workload_that_fails_to_compile_is_not_enforced(
    service: XdsService, clients: Clients
) -> None:
    """A policy set handed to the control plane without the watcher's check: the compiler's
    backstop refuses the regex Envoy would refuse, the workload keeps its last good config,
    and status says the policy set is NOT ENFORCED there (not merely "in sync")."""
    long_path = "/x/" + "/".join(["{*}"] * 40) + "/y"
    deny = f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-deny, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["{long_path}"]}}}}]}}]
"""
    clients.open("shop/orders", subscriptions=with_routes("shop/orders"))
    await until(lambda: in_sync(service, "shop/orders"), what="sync")
    service.control.apply_policy(
        parse({"mesh.yaml": WORKLOADS + ORDERS_POLICY % ("", '"GET"') + deny})
    )
    entry = node(service, "shop/orders")
    assert entry["policy_enforced"] is False
    assert (
        "408" in entry["not_enforced"]["error"]
        and "compile error" in entry["not_enforced"]["error"]
    )
    assert any("orders-deny" in p for p in entry["not_enforced"]["policies"])
    assert node(service, "shop/orders")["streams"]  # still connected, on its old config
    # The metrics (and the summary) count it too, from fleet counts, not per-node documents.
    assert service.metrics_state()["fleet"]["not_enforced"] == 1
    assert service.status("summary")["fleet"]["not_enforced"] == 1
    service.control.apply_policy(policy())
    await until(lambda: node(service, "shop/orders")["policy_enforced"], what="enforced again")


async def test_rejected_policy_change_is_reported(service: XdsService) -> None:
    from meshward.policy import PolicyError, Problem

    version = service.control.policy.version
    service.control.reject_policy(PolicyError([Problem("bad.yaml", 1, "spec.action", "nope")]))
    status = service.status()
    assert status["policy"]["version"] == version and "bad.yaml" in status["policy"]["error"]
    args = argparse.Namespace(xds=service.admin_url, node=None, json=True, timeout=5.0)
    assert await asyncio.to_thread(status_cli.run, args) == 1


@pytest.mark.parametrize("process", [False, True], ids=["compile-thread", "compile-process"])
async def test_expiring_policy_is_repushed_at_its_instant(
    ca: CertificateAuthority, clients: Clients, process: bool
) -> None:
    plain = policy('"GET"')
    svc = XdsService(plain, ca, compiler_for(CompileOptions(), process=process), admin=None)
    await svc.start()
    try:
        clients.service = svc
        client = clients.open("shop/orders", follow_routes=True)
        inbound = "inbound|8080|orders.shop"
        await until(lambda: inbound in client.view(typeurls.ROUTE).resources, what="the route")
        await until(lambda: in_sync(svc, "shop/orders"), what="sync")
        # The instant is set only now that the compile worker is up and the node in sync, so a
        # loaded machine (CI: 2 cores, two test workers) does not reach it before it is applied.
        expires = (datetime.now(UTC) + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        annotated = policy('"GET"', f', annotations: {{"meshward.dev/expires-at": "{expires}"}}')
        await asyncio.to_thread(svc.control.apply_policy, annotated)
        assert svc.status()["policy"]["next_expiry"] is not None
        await until(lambda: in_sync(svc, "shop/orders"), what="sync with the expiring policy")
        # The expiring policy's rules are in the route config: the re-push is an RDS push.
        rds_before = client.view(typeurls.ROUTE).responses
        await until(
            lambda: client.view(typeurls.ROUTE).responses > rds_before, timeout=15, what="re-push"
        )
        assert svc.status()["policy"]["next_expiry"] is None
        assert svc.control.policy.version == annotated.version  # same policy, new decisions
        # ... and the route now says what a fresh full compile after the instant says.
        later = datetime.now(UTC) + timedelta(seconds=5)
        workload = annotated.workload("shop/orders")
        assert workload is not None
        fresh = compiler_for(CompileOptions())(annotated, workload, later)
        want = next(
            m
            for m in fresh
            if getattr(m, "name", None) == inbound and "RouteConfiguration" in type(m).__name__
        ).SerializeToString(deterministic=True)
        await until(
            lambda: client.view(typeurls.ROUTE).resources[inbound].value == want,
            timeout=5,
            what="the route as compiled after the expiry",
        )
    finally:
        await svc.stop()


async def test_server_certificate_renews_without_restart(
    service: XdsService, ca: CertificateAuthority
) -> None:
    import socket

    from cryptography import x509

    svid = ca.issue("spiffe://cluster.local/ns/shop/sa/frontend")
    context = client_ssl_context(
        svid.cert_chain_pem, svid.private_key_pem, ca.trust_bundle().roots_pem
    )

    def serial() -> int:
        with (
            socket.create_connection(("127.0.0.1", service.port or 0), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)

    first = await asyncio.to_thread(serial)
    from meshward.xds.controlplane import SERVER_KEY

    now = datetime.now(UTC)
    service.control.schedule.retry(SERVER_KEY, now)  # make the server's renewal due now
    service.control.maintain(now)
    second = await asyncio.to_thread(serial)
    assert second != first
    assert service.status()["server_certificate"]["spiffe_id"].endswith("/sa/meshward-xds")


async def test_a_restarted_control_plane_resyncs_nodes_without_pushing_config(
    ca: CertificateAuthority, clients: Clients
) -> None:
    """Clients (SotW and delta, following routes as Envoy does) reconnect to a new control
    plane process on the same address: listeners, routes and clusters are not sent again and
    the node ACKs the very versions it had."""
    first = XdsService(policy('"GET", "POST"'), ca, compiler_for(CompileOptions()), admin=None)
    await first.start()
    clients.service = first
    nodes = {"shop/orders": False, "shop/payments": True}  # node -> delta
    opened = {n: clients.open(n, delta=d, follow_routes=True) for n, d in nodes.items()}
    second: XdsService | None = None

    def resynced(server: XdsService, name: str) -> bool:
        # RDS is asked for only once listeners have arrived: in sync without it is too early.
        if not in_sync(server, name):
            return False
        kinds = {t["type"] for s in node(server, name)["streams"] for t in s["types"]}
        return {"CDS", "LDS", "RDS", "SDS"} <= kinds

    try:
        await until(lambda: all(resynced(first, n) for n in nodes), what="sync")
        await until(
            lambda: all(c.view(typeurls.ROUTE).resources for c in opened.values()), what="routes"
        )
        acked = {n: {t["type"]: t["acked"] for t in node(first, n)["streams"][0]["types"]}
                 for n in nodes}  # fmt: skip
        assert all({"CDS", "LDS", "RDS", "SDS"} <= acked[n].keys() for n in nodes)
        responses = {n: {t: v.responses for t, v in c.views.items()} for n, c in opened.items()}
        port = first.port
        await first.stop()
        await until(lambda: all(c.error is not None for c in opened.values()), what="stream end")
        second = XdsService(
            policy('"GET", "POST"'), ca, compiler_for(CompileOptions()),
            admin=None, listen=f"127.0.0.1:{port}",
        )  # fmt: skip
        await second.start()
        for client in opened.values():
            clients.tasks.append(asyncio.create_task(client.run()))

        await until(lambda: all(resynced(second, n) for n in nodes), what="resync")
        for name, client in opened.items():
            after = {t["type"]: t for t in node(second, name)["streams"][0]["types"]}
            for kind in ("CDS", "LDS", "RDS"):
                assert after[kind]["acked"] == acked[name][kind], (name, kind)
                assert after[kind]["pushes"] == 0, (name, kind)
            for type_url in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE):
                assert client.view(type_url).responses == responses[name][type_url], name
            # The trust bundle is the same too: nothing of the control plane's making
            # changed (no SVID of its own for the node, as there was none before).
            assert after["SDS"]["acked"] == acked[name]["SDS"]
    finally:
        await first.stop()
        if second is not None:
            await second.stop()


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def ads_handshake(port: int, ca: CertificateAuthority, svid: Any, roots: bytes) -> tuple[int, bool]:
    """A TLS connection to the ADS port as a sidecar with these credentials makes it: (the CA
    generation that signed the server's certificate, whether the server accepted the client
    certificate). Raises ssl.SSLCertVerificationError if the server's chain does not verify."""
    import socket
    import ssl

    from cryptography import x509

    context = client_ssl_context(svid.cert_chain_pem, svid.private_key_pem, roots)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        generation = ca.issuing_generation(x509.load_der_x509_certificate(der))
        assert generation is not None
        try:  # TLS 1.3: a rejected client certificate shows at the first read
            tls.sendall(H2_PREFACE)
            accepted = bool(tls.recv(9))
        except (ssl.SSLError, OSError):
            accepted = False
        return generation.number, accepted


async def test_ads_credentials_from_before_a_ca_rotation_work_until_the_old_root_is_dropped(
    clients: Clients,
) -> None:
    """`meshward ca rotate`, then the control plane (re)starts: sidecars whose bootstrap
    credentials predate the rotation still connect (the server certificate comes from the
    oldest trusted generation; client certificates of every trusted root are accepted) and
    `meshward status` flags them. When the old root is dropped, the server moves to the new
    generation and old client certificates are refused."""
    import ssl

    ca = CertificateAuthority.ephemeral("cluster.local")
    identity = "spiffe://cluster.local/ns/shop/sa/frontend"
    old, old_roots = ca.issue(identity), ca.trust_bundle().roots_pem
    ca.rotate(grace=timedelta(seconds=30))
    svc = XdsService(policy(), ca, compiler_for(CompileOptions()), admin=None)
    await svc.start()
    try:
        port = svc.port or 0
        new, both_roots = ca.issue(identity), ca.trust_bundle().roots_pem
        assert await asyncio.to_thread(ads_handshake, port, ca, old, old_roots) == (1, True)
        assert await asyncio.to_thread(ads_handshake, port, ca, new, both_roots) == (1, True)
        assert svc.status()["server_certificate"]["ca_generation"] == 1
        # A sidecar on pre-rotation credentials is flagged by `meshward status`.
        client = AdsClient(
            "127.0.0.1", port, "shop/frontend",
            client_ssl_context(old.cert_chain_pem, old.private_key_pem, old_roots),
            server_identity=svc.server_identity, subscriptions=dict(ALL_TYPES),
        )  # fmt: skip
        clients.tasks.append(asyncio.create_task(client.run()))
        await until(lambda: in_sync(svc, "shop/frontend"), what="sync")
        entry = node(svc, "shop/frontend")
        credentials = entry["streams"][0]["ads_credentials"]
        assert credentials["ca_generation"] == 1 and credentials["state"] == "root-retiring"
        assert "meshward bootstrap" in entry["ads_credentials_warning"]
        rendered = status_cli.render(svc.status())
        assert "RETIRING" in rendered and "meshward bootstrap --renew" in rendered
        # The grace period ends: the bundle and the server certificate move on at once.
        after_grace = datetime.now(UTC) + timedelta(seconds=40)
        assert svc.control.seconds_until_next(datetime.now(UTC)) <= 30
        svc.control.maintain(after_grace)
        assert svc.status()["server_certificate"]["ca_generation"] == 2
        assert await asyncio.to_thread(ads_handshake, port, ca, new, both_roots) == (2, True)
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(ads_handshake, port, ca, new, old_roots)
        assert await asyncio.to_thread(ads_handshake, port, ca, old, both_roots) == (2, False)
    finally:
        await svc.stop()


async def test_status_is_a_summary_by_default_with_a_paged_filterable_node_view(
    service: XdsService, clients: Clients
) -> None:
    """GET /status counts the fleet and names the nodes needing attention (no per-node
    documents); ?view=nodes gives those documents, filtered by node or workload and a page at
    a time; a query it cannot answer is a 400 that says why."""

    def nack(type_url: str, response: Any) -> str | None:
        return "rejected for the test" if type_url == typeurls.ROUTE else None

    clients.open("shop/frontend")
    clients.open("shop/orders", nack=nack, subscriptions=with_routes("shop/orders"))
    await until(lambda: in_sync(service, "shop/frontend"), what="sync")
    await until(
        lambda: any(n["node"] == "shop/orders" and not n["policy_enforced"]
                    for n in service.status()["nodes"]),
        what="the NACK",
    )  # fmt: skip
    code, body = await http_get(f"{service.admin_url}/status")
    summary = json.loads(body)
    assert code == 200 and summary["view"] == "summary" and "nodes" not in summary
    fleet = summary["fleet"]
    assert fleet["connected"] == 2 and fleet["in_sync"] == 1 and fleet["not_enforced"] == 1
    assert fleet["streams"] == {"sotw": 2, "delta": 0}
    assert fleet["attention"] == [{"node": "shop/orders", "problems": ["not enforced"]}]
    assert summary["workloads"]["count"] >= 2 and summary["workloads"]["errors"] == {}
    assert summary["policy"]["version"] == service.control.policy.version

    code, body = await http_get(f"{service.admin_url}/status?view=nodes&node=shop/orders")
    only = json.loads(body)
    assert [n["node"] for n in only["nodes"]] == ["shop/orders"]
    assert only["nodes"][0]["not_enforced"]["types"] == ["RDS"]

    code, body = await http_get(f"{service.admin_url}/status?view=nodes&limit=1")
    first = json.loads(body)
    assert len(first["nodes"]) == 1 and first["page"]["total"] == 2
    assert first["page"]["next_offset"] == 1
    code, body = await http_get(f"{service.admin_url}/status?view=nodes&limit=1&offset=1")
    second = json.loads(body)
    assert second["page"]["next_offset"] is None
    assert {first["nodes"][0]["node"], second["nodes"][0]["node"]} == {
        "shop/frontend",
        "shop/orders",
    }
    # `meshward status` reads every page.
    every = await asyncio.to_thread(status_cli.fetch_nodes, service.admin_url or "", 5, ())
    assert sorted(n["node"] for n in every["nodes"]) == ["shop/frontend", "shop/orders"]

    for query, why in (
        ("view=everything", "view must be summary or nodes"),
        ("view=nodes&limit=0", "limit must be at least 1"),
        ("view=nodes&limit=5000", "limit must be at most 1000"),
        ("view=nodes&offset=-1", "offset must be a whole number"),
        ("limit=5", "need view=nodes"),
        ("colour=blue", "unknown parameter 'colour'"),
    ):
        with pytest.raises(urllib.error.HTTPError) as caught:
            await http_get(f"{service.admin_url}/status?{query}")
        assert caught.value.code == 400
        assert why in caught.value.read().decode(), query


def _samples(text: str) -> dict[str, float]:
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def test_metrics_time_a_policy_rollout_until_every_node_acked(
    service: XdsService, clients: Clients
) -> None:
    """The rollout histogram observes once per version, when the last connected node ACKed it;
    per-node sync and the CA and credential expiry gauges come with the same scrape."""
    for name in ("shop/frontend", "shop/orders"):
        clients.open(name, subscriptions=with_routes(name))
    await until(lambda: in_sync(service, "shop/frontend") and in_sync(service, "shop/orders"))
    first = _samples(service.metrics.exposition().decode())
    assert first["meshward_xds_policy_generation"] == 1
    assert first["meshward_xds_policy_rollout_pending"] == 0
    assert first["meshward_xds_policy_rollout_seconds_count"] == 1
    assert first['meshward_xds_node_in_sync{node="shop/orders"}'] == 1
    assert first['meshward_xds_node_policy_enforced{node="shop/orders"}'] == 1
    now = datetime.now(UTC).timestamp()
    assert first['meshward_xds_node_credential_expiry_timestamp_seconds{node="shop/orders"}'] > now
    assert 0 < now - first['meshward_xds_node_last_ack_timestamp_seconds{node="shop/orders"}'] < 60
    assert first['meshward_ca_expiry_timestamp_seconds{certificate="root"}'] > now
    assert first['meshward_ca_expiry_timestamp_seconds{certificate="intermediate"}'] > now
    assert first["meshward_xds_server_cert_expiry_timestamp_seconds"] > now
    assert not any("version=" in k for k in first if k.startswith("meshward_xds_policy_gen"))

    service.control.apply_policy(policy('"GET", "POST"'))
    pending = _samples(service.metrics.exposition().decode())
    assert pending["meshward_xds_policy_generation"] == 2
    await until(lambda: in_sync(service, "shop/orders"), what="the new version ACKed")
    done = _samples(service.metrics.exposition().decode())
    assert done["meshward_xds_policy_rollout_pending"] == 0
    assert done["meshward_xds_policy_rollout_seconds_count"] == 2
    assert done['meshward_xds_policy_rollouts_total{result="completed"}'] == 2
    assert 0 <= done["meshward_xds_policy_rollout_seconds_sum"] < 60
    infos = [k for k in done if k.startswith("meshward_xds_policy_info{")]
    assert len(infos) == 1  # only the version in force, never one series per version


async def test_metrics_state_agrees_with_the_per_node_view(
    service: XdsService, clients: Clients
) -> None:
    """/metrics reads fleet counts (no per-node documents); they say what the per-node view
    says: connected nodes, streams, drift per node, ADS credential expiry per node."""
    clients.open("shop/frontend")
    clients.open("shop/orders", subscriptions=with_routes("shop/orders"))
    await until(
        lambda: in_sync(service, "shop/frontend") and in_sync(service, "shop/orders"),
        what="sync",
    )
    state = service.metrics_state()
    nodes = service.status()["nodes"]
    assert state["fleet"]["connected"] == sum(1 for n in nodes if n["connected"]) == 2
    assert state["fleet"]["streams"]["sotw"] == sum(len(n["streams"]) for n in nodes)
    assert state["node_drift"] == {n["node"]: n["drift"] for n in nodes}
    assert state["policy"]["version"] == service.control.policy.version
    health = {h["node"]: h for h in state["nodes"]}
    assert health.keys() == {n["node"] for n in nodes if n["connected"]}
    for n in nodes:
        light = health[n["node"]]
        assert (light["drift"], light["policy_enforced"]) == (n["drift"], n["policy_enforced"])
        assert [s["ads_credentials"]["not_after"] for s in light["streams"]] == [
            s["ads_credentials"]["not_after"] for s in n["streams"]
        ]
        assert [[t["in_sync"] for t in s["types"]] for s in light["streams"]] == [
            [t["in_sync"] for t in s["types"]] for s in n["streams"]
        ]


def recomputed_summary(service: XdsService) -> dict[str, Any]:
    """The summary recomputed from every stream's per-type state (the reference the
    event-kept counts must equal)."""
    from meshward.xds.status import FleetCounts, stream_flags

    ads = service.ads
    now = ads.clock()
    by_node: dict[str, list[Any]] = {}
    for stream in sorted(ads.streams.values(), key=lambda s: s.id):
        by_node.setdefault(str(stream.node), []).append(stream)
    counts = FleetCounts()
    for name in sorted(set(by_node) | set(ads.cache.nodes())):
        snapshot = ads.cache.get(name)
        counts.add(
            name,
            [
                (s.mode, stream_flags(s.protocol.states, snapshot, now, ads.drift_threshold))
                for s in by_node.get(name, [])
            ],
        )
    return counts.as_dict()


def assert_summary_matches(service: XdsService) -> dict[str, Any]:
    got = service.status("summary")["fleet"]
    want = recomputed_summary(service)
    assert {k: got[k] for k in want} == want
    return dict(got)


async def test_event_kept_counts_match_real_streams_through_edits_and_disconnects(
    service: XdsService, clients: Clients
) -> None:
    nodes = ["shop/frontend", "shop/orders", "shop/orders/2", "shop/payments"]
    for name in nodes:
        clients.open(
            name,
            delta=name == "shop/orders/2",
            subscriptions=with_routes("/".join(name.split("/")[:2])),
        )
    await until(lambda: all(in_sync(service, n) for n in nodes), what="initial sync")
    got = assert_summary_matches(service)
    assert (got["connected"], got["in_sync"], got["streams"]) == (4, 4, {"sotw": 3, "delta": 1})
    service.control.apply_policy(policy('"GET", "PUT"'))
    got = assert_summary_matches(service)  # the new version counts before any node answers
    assert got["in_sync"] == 2 and got["out_of_sync_types"] == {"RDS": 2}
    await until(lambda: all(in_sync(service, n) for n in nodes), what="sync")
    assert assert_summary_matches(service)["in_sync"] == 4
    for task in clients.tasks[1:3]:  # both orders nodes disconnect
        task.cancel()
    await until(lambda: service.status("summary")["fleet"]["connected"] == 2, what="disconnect")
    got = assert_summary_matches(service)
    assert (got["disconnected"], got["in_sync"], got["streams"]) == (2, 2, {"sotw": 2, "delta": 0})
