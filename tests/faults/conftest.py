"""A small mesh of real processes for fault tests, built by the one mesh builder
(:class:`meshward.testing.mesh.Mesh`, ``control_plane="process"``): `meshward xds serve` and
`meshward extauthz serve` as child processes (so they can be SIGKILLed and restarted on the same
ports), echo apps, and one sidecar per workload: a `meshward agent` process (key on the node,
first SVID by join token, SDS over a Unix socket) and the Envoy it runs.

Shop policy (STRICT mTLS everywhere):
- orders: frontend may GET/POST /orders* (native RBAC);
- payments: orders may POST /payments* on behalf of an end user whose JWT has scope
  payments:write (ext_authz); nobody reaches /admin (native DENY);
- inventory: orders may GET /inventory* (native RBAC).

The control plane signs 60 s SVIDs (the CA's minimum) for the agents' CSRs, and the agents renew
them every ~12 s (10% of the 120 s lifetime including the CA's 60 s backdating): every fault
test also runs under continuous SVID rotation.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from meshward.testing.jwt_issuer import LocalIssuer
from meshward.testing.mesh import Mesh
from meshward.testing.processes import ComponentFailed, Launcher
from meshward.testing.topology import shop_yaml
from meshward.testing.traffic import Flow

TD = "cluster.local"
FRONTEND, ORDERS, PAYMENTS, INVENTORY = (
    "shop/frontend",
    "shop/orders",
    "shop/payments",
    "shop/inventory",
)
REFS = (FRONTEND, ORDERS, PAYMENTS, INVENTORY)
DELTA = {ORDERS, INVENTORY}  # these sidecars speak delta ADS, the others SotW
WATCH_INTERVAL = 0.2  # policy directory poll of both servers (seconds)
SPARE_PORT = 9090  # a second port of orders, bound at start but declared only by a test

# jwtEnforcement extauthz: payments' JWT rule goes to ext_authz, whose faults these tests inject
MESH_YAML = shop_yaml([], mesh={"jwtEnforcement": "extauthz"})
WORKLOADS_YAML = "".join(
    f"""---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec:
  ports: [{{name: http, port: 8080, protocol: HTTP}}]
"""
    for name in ("frontend", "orders", "payments", "inventory")
)
ORDERS_YAML = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {methods: ["GET", "POST"], paths: ["/orders", "/orders/*"]}}]
"""
PAYMENTS_POLICIES_YAML = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-allow-orders-with-user, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"], requestPrincipals: ["*"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/payments", "/payments/*"]}}]
    when: [{key: "request.auth.claims[scope]", values: ["payments:write"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payments-deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: payments}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin", "/admin/*"]}}]}]
"""
INVENTORY_YAML = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: inventory-allow-orders, namespace: shop}
spec:
  selector: {matchLabels: {app: inventory}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/orders"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/inventory", "/inventory/*"]}}]
"""


class FaultMesh(Mesh):
    """The mesh of processes (the one mesh builder's, control plane and ext_authz as processes);
    see the module docstring. What is the fault tests' own: the policy, the tokens, the traffic
    and the names the tests kill and restart servers by."""

    def __init__(self, root: Path, issuer: LocalIssuer) -> None:
        from meshward.policy import WorkloadPort
        from meshward.xds.bootstrap import ENVOY_ARGS

        self.root = root
        self.issuer = issuer
        extauthz = (
            "--ca", str(root / "ca"),  # its own SVID; follows the CA rotation test
            # one process, as the kill/restart faults assume (the worker supervisor has its
            # own tests, tests/integration/test_extauthz_workers.py)
            "--workers", "1",
            "--metrics-listen", "127.0.0.1:0",
            "--poll-interval", str(WATCH_INTERVAL),
        )  # fmt: skip
        super().__init__(
            root / "policies",
            root,
            REFS,
            control_plane="process",
            launcher=Launcher(root, quiet=True),
            delta=DELTA,
            svid_ttl=timedelta(seconds=60),  # the CA's minimum
            drift_threshold=2.0,
            watch_interval=WATCH_INTERVAL,
            xds_args=("--access-log", "access.log"),
            extauthz=extauthz,
            envoy_args=ENVOY_ARGS,
            # renew every ~12 s of the 120 s lifetime (60 s + the CA's 60 s backdating), and
            # learn a rotated bundle within a second
            agent_args=("--renew-fraction", "0.1", "--jitter", "0.02", "--bundle-poll", "1"),
            # bound ahead: orders' spare port, which a test declares later (spare_listen_port)
            extra_ports={ORDERS: (WorkloadPort("admin", SPARE_PORT),)},
        )
        self.good_token = issuer.token("alice", ttl=3600, scope="payments:write")
        self.read_token = issuer.token("bob", ttl=3600, scope="payments:read")

    # -- policy files ------------------------------------------------------------------------------
    def payments_yaml(self) -> str:
        return (
            self.issuer.request_authentication_yaml("shop", "payments-jwt", {"app": "payments"})
            + PAYMENTS_POLICIES_YAML
        )

    def write_policies(self) -> None:
        self.policy_dir.mkdir(parents=True, exist_ok=True)
        files = {
            "mesh.yaml": MESH_YAML,
            "workloads.yaml": WORKLOADS_YAML,
            "orders.yaml": ORDERS_YAML,
            "payments.yaml": self.payments_yaml(),
            "inventory.yaml": INVENTORY_YAML,
        }
        for name, text in files.items():
            replace_file(self.policy_dir / name, text)

    # -- start, faults -------------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> FaultMesh:
        self.write_policies()
        super().start(timeout)
        return self

    def start_extauthz(self, *, wait: bool = True) -> None:
        self.start_server("extauthz", wait=wait)

    def start_xds(self, *, wait: bool = True) -> None:
        self.start_server("xds", wait=wait)

    def kill(self, name: str) -> None:
        """SIGKILL a server process (no goodbye to anyone) and reap it."""
        assert self.supervisor[name].alive(), name
        self.kill_server(name)

    def restart_sidecar(self, ref: str) -> None:
        """Stop a sidecar's agent (it drains and stops its Envoy) and start it again: it resumes
        with the SVID in its state directory and starts a fresh Envoy (a new ADS stream)."""
        self.launcher.restart(self._name(ref))

    @property
    def ads_port(self) -> int:
        return int(self.ads_address.rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        return int(self.admin_url.rstrip("/").rsplit(":", 1)[1])

    # -- addresses and status ----------------------------------------------------------------------
    def outbound(self, source: str, target: str) -> int:
        return self.outbound_port(source, target)

    @property
    def spare_listen_port(self) -> int:
        """Where orders' sidecar would listen for its declared port 9090."""
        return self.inbound_port(ORDERS, SPARE_PORT)

    def node(self, ref: str) -> dict[str, Any]:
        return next(n for n in self.status()["nodes"] if n["node"] == ref)

    def in_sync(self) -> bool:
        """Every sidecar connected and has ACKed its desired config (whatever the policy
        status says)."""
        nodes = {n["node"]: n for n in self.status()["nodes"]}
        return all(
            ref in nodes
            and nodes[ref]["connected"]
            and all(t["in_sync"] for s in nodes[ref]["streams"] for t in s["types"])
            for ref in REFS
        )

    def policy_version(self) -> str:
        return str(self.status()["policy"]["version"])

    def extauthz_version(self) -> str:
        """The policy version ext_authz serves (its metrics' info gauge)."""
        with urllib.request.urlopen(
            f"http://{self.servers.extauthz_metrics}/metrics", timeout=2
        ) as response:
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith("meshward_extauthz_policy_info{") and not line.endswith(" 0.0"):
                return line.split('version="', 1)[1].split('"', 1)[0]
        raise AssertionError("ext_authz exposes no policy version")

    # -- traffic -------------------------------------------------------------------------------------
    def flows(self) -> list[Flow]:
        """Every kind of request the steady traffic sends, with what the policy says."""
        good = {"authorization": f"Bearer {self.good_token}"}
        read = {"authorization": f"Bearer {self.read_token}"}
        fo, op, oi = (
            self.outbound(FRONTEND, ORDERS),
            self.outbound(ORDERS, PAYMENTS),
            self.outbound(ORDERS, INVENTORY),
        )
        return [
            Flow("orders-get", fo, "GET", "/orders/1", expect=200),
            Flow("orders-delete", fo, "DELETE", "/orders/1", expect=403),
            Flow("pay-ok", op, "POST", "/payments", good, expect=200),
            Flow("pay-no-token", op, "POST", "/payments", expect=403),
            Flow("pay-read-scope", op, "POST", "/payments", read, expect=403),
            Flow("pay-admin", op, "POST", "/admin", good, expect=403),
            Flow("inventory-get", oi, "GET", "/inventory/7", expect=200),
        ]


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp file + rename), the way a careful tool edits policy."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


@pytest.fixture(scope="module")
def fault_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultMesh]:
    issuer = LocalIssuer()
    for attempt in (1, 2):
        mesh = FaultMesh(tmp_path_factory.mktemp("fault-mesh"), issuer)
        try:
            mesh.start()
            break
        except (AssertionError, TimeoutError, ComponentFailed):
            # Ports are picked before they are bound; on a shared machine another process can
            # take one in between (Envoy then NACKs that listener). Once more, with new ports.
            print(f"fault mesh did not start (logs: {mesh.root / 'logs'})")
            mesh.stop()
            if attempt == 2:
                raise
    try:
        yield mesh
    finally:
        print(f"fault mesh logs: {mesh.root / 'logs'}")
        mesh.stop()
