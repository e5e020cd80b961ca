"""A small mesh of real processes for fault tests: `meshward xds serve` and `meshward extauthz
serve` as child processes (so they can be SIGKILLed and restarted on the same ports), echo apps,
and one sidecar per workload: a `meshward agent` process (key on the node, first SVID by join
token, SDS over a Unix socket) and the Envoy it runs.

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

import itertools
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.demo import status_poll
from meshward.testing.echo import EchoServer
from meshward.testing.jwt_issuer import LocalIssuer
from meshward.testing.mesh import (
    AgentEnvoy,
    agent_argv,
    agent_serving,
    agent_status,
    write_join_token,
)
from meshward.testing.processes import Component, ComponentFailed, Launcher
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

MESH_YAML = """\
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
# jwtEnforcement extauthz: payments' JWT rule goes to ext_authz, whose faults these tests inject
spec: {trustDomain: cluster.local, rootNamespace: meshward-system, jwtEnforcement: extauthz}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: meshward-system}
spec: {mtls: {mode: STRICT}}
"""
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


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


class FaultMesh:
    """The mesh of processes; see the module docstring. Everything binds to 127.0.0.1."""

    def __init__(self, root: Path, issuer: LocalIssuer) -> None:
        self.root = root
        self.issuer = issuer
        self.policy_dir = root / "policies"
        self.ca_dir = root / "ca"
        self.supervisor = Launcher(root, quiet=True)
        self.echoes: dict[str, EchoServer] = {}
        self.envoys: dict[str, AgentEnvoy] = {}
        self.agent_root = Path(tempfile.mkdtemp(prefix="mwf-"))  # short: Unix socket paths
        self.agent_dirs: dict[str, Path] = {}
        self.bindings: dict[str, Any] = {}
        self.ads_port = self.admin_port = self.extauthz_port = self.extauthz_metrics_port = 0
        self.xds_argv: list[str] = []
        self.extauthz_argv: list[str] = []
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

    # -- start ---------------------------------------------------------------------------------------
    def start(self) -> FaultMesh:
        from meshward.compile import runtime_bindings
        from meshward.net import free_port
        from meshward.policy import WorkloadPort, load
        from meshward.xds.cli import dump_bindings

        self.write_policies()
        policy = load([self.policy_dir])
        CertificateAuthority.init(self.ca_dir, TD)
        for ref in REFS:
            echo = EchoServer(ref.split("/")[1])
            echo.__enter__()
            self.echoes[ref] = echo
        app_ports = {(ref, 8080): echo.port for ref, echo in self.echoes.items()}
        app_ports[(ORDERS, SPARE_PORT)] = self.echoes[ORDERS].port
        supply = (free_port() for _ in itertools.count())
        # Bound ahead: orders' spare port, which a test declares later (see spare_listen_port).
        spare = WorkloadPort("admin", SPARE_PORT)
        workloads = [
            replace(w, ports=(*w.ports, spare)) if w.ref == ORDERS else w for w in policy.workloads
        ]
        self.bindings = runtime_bindings(workloads, supply, app_ports=app_ports)
        bindings_file = self.root / "bindings.json"
        bindings_file.write_text(json.dumps(dump_bindings(self.bindings), indent=2))
        self.ads_port, self.admin_port, self.join_port = free_port(), free_port(), free_port()
        self.extauthz_port, self.extauthz_metrics_port = free_port(), free_port()
        python = sys.executable
        self.extauthz_argv = [
            python, "-m", "meshward", "extauthz", "serve",
            "--policy", str(self.policy_dir),
            "--listen", f"127.0.0.1:{self.extauthz_port}",
            "--ca", str(self.ca_dir),  # its own SVID; follows the CA rotation test
            # one process, as the kill/restart faults assume (the worker supervisor has its own
            # tests, tests/integration/test_extauthz_workers.py)
            "--workers", "1",
            "--metrics-listen", f"127.0.0.1:{self.extauthz_metrics_port}",
            "--poll-interval", str(WATCH_INTERVAL),
            "--ready-file", str(self.root / "extauthz.json"),
        ]  # fmt: skip
        self.xds_argv = [
            python, "-m", "meshward", "xds", "serve",
            "--policy", str(self.policy_dir),
            "--ca", str(self.ca_dir),
            "--listen", f"127.0.0.1:{self.ads_port}",
            "--admin", f"127.0.0.1:{self.admin_port}",
            "--bindings", str(bindings_file),
            "--extauthz", f"127.0.0.1:{self.extauthz_port}",
            "--access-log", "access.log",
            "--svid-ttl", "60s",
            # sidecars run under `meshward agent`: keys stay with them, first SVID by join token
            "--secrets", "agent",
            "--join-listen", f"127.0.0.1:{self.join_port}",
            "--drift-threshold", "2s",
            "--watch-interval", str(WATCH_INTERVAL),
            "--ready-file", str(self.root / "xds.json"),
        ]  # fmt: skip
        self.start_extauthz(wait=False)
        self.start_xds(wait=False)
        self.supervisor.wait_ready(["extauthz", "xds"])
        self._start_sidecars(policy)
        self.wait_converged(timeout=60)
        return self

    def _launch(self, name: str, argv: list[str], ready_file: Path) -> Component:
        return self.supervisor.launch(name, argv, ready_path=ready_file, timeout=60)

    def start_extauthz(self, *, wait: bool = True) -> None:
        self._launch("extauthz", self.extauthz_argv, self.root / "extauthz.json")
        if wait:
            self.supervisor.wait_ready(["extauthz"])

    def start_xds(self, *, wait: bool = True) -> None:
        self._launch("xds", self.xds_argv, self.root / "xds.json")
        if wait:
            self.supervisor.wait_ready(["xds"])

    def kill(self, name: str) -> None:
        """SIGKILL a server process (no goodbye to anyone) and reap it."""
        assert self.supervisor[name].alive(), name
        self.supervisor.kill(name)

    def restart_sidecar(self, ref: str) -> None:
        """Stop a sidecar's agent (it drains and stops its Envoy) and start it again: it resumes
        with the SVID in its state directory and starts a fresh Envoy (a new ADS stream)."""
        self.supervisor.restart(f"{ref.split('/')[1]}-sidecar")

    def agent_status(self, ref: str) -> dict[str, Any]:
        return agent_status(self.agent_dirs[ref])

    def _start_sidecars(self, policy: Any) -> None:
        from meshward.xds.bootstrap import ENVOY_ARGS

        roots = self.root / "root.pem"
        roots.write_bytes(CertificateAuthority.load(self.ca_dir).trust_bundle().roots_pem)
        for ref in REFS:
            name = ref.split("/")[1]
            state = self.agent_root / name
            self.agent_dirs[ref] = state
            argv = agent_argv(
                ref,
                f"127.0.0.1:{self.ads_port}",
                state,
                trust_domain=TD,
                root_namespace=policy.mesh.root_namespace,
                join=f"127.0.0.1:{self.join_port}",
                token_file=write_join_token(self.ca_dir, ref, self.root / f"{name}.token"),
                root_cert=roots,
                delta=ref in DELTA,
                envoy_args=ENVOY_ARGS,
                # renew every ~12 s of the 120 s lifetime (60 s + the CA's 60 s backdating), and
                # learn a rotated bundle within a second
                extra=("--renew-fraction", "0.1", "--jitter", "0.02", "--bundle-poll", "1"),
            )
            self.envoys[ref] = AgentEnvoy(state, name=f"{name}-sidecar")
            self.supervisor.launch(f"{name}-sidecar", argv, ready=agent_serving(state), timeout=60)
        self.supervisor.wait_ready()

    # -- addresses and status ----------------------------------------------------------------------
    def outbound(self, source: str, target: str) -> int:
        return int(self.bindings[source].outbound[f"{target}:8080"].port)

    def inbound(self, ref: str, port: int = 8080) -> int:
        return int(self.bindings[ref].ports[port].listen.port)

    @property
    def spare_listen_port(self) -> int:
        """Where orders' sidecar would listen for its declared port 9090."""
        return self.inbound(ORDERS, SPARE_PORT)

    def status(self) -> dict[str, Any]:
        return status_poll.fetch_status(f"http://127.0.0.1:{self.admin_port}")

    def node(self, ref: str) -> dict[str, Any]:
        return next(n for n in self.status()["nodes"] if n["node"] == ref)

    def converged(self, version: str | None = None) -> bool:
        return status_poll.converged(self.status(), REFS, version)

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

    def wait_converged(self, version: str | None = None, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: self.converged(version), timeout, f"convergence on {version}")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {status_poll.lagging(self.status(), REFS, version)}"
            ) from None

    def policy_version(self) -> str:
        return str(self.status()["policy"]["version"])

    def extauthz_version(self) -> str:
        """The policy version ext_authz serves (its metrics' info gauge)."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.extauthz_metrics_port}/metrics", timeout=2
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

    def stop(self) -> None:
        try:
            self.supervisor.stop_all()
            for envoy in self.envoys.values():
                envoy.stop()  # an Envoy whose agent died without stopping it
        finally:
            for echo in self.echoes.values():
                echo.__exit__(None, None, None)
            shutil.rmtree(self.agent_root, ignore_errors=True)


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
        except (AssertionError, ComponentFailed):
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
