"""Small real Envoy resources for tests and benchmarks of meshward.xds (json_format-built)."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format

from meshward.xds.resources import Resource, make_resource

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def cluster(name: str, port: int = 8080) -> Resource:
    message = json_format.ParseDict(
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {
                                        "socket_address": {
                                            "address": "127.0.0.1",
                                            "port_value": port,
                                        }
                                    }
                                }
                            }
                        ]
                    }
                ],
            },
        },
        cluster_pb2.Cluster(),
    )
    return make_resource(message)


def listener(
    name: str, cluster_name: str = "app", *, port: int = 15006, secrets: bool = True, tag: str = ""
) -> Resource:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM,
                    "stat_prefix": name + tag,
                    "route_config": {
                        "name": name,
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [
                                    {"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}
                                ],
                            }
                        ],
                    },
                    "http_filters": [
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                    ],
                },
            }
        ]
    }
    if secrets:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS,
                "require_client_certificate": True,
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [
                        {"name": "default", "sds_config": {"ads": {}}}
                    ],
                    "validation_context_sds_secret_config": {
                        "name": "ROOTCA",
                        "sds_config": {"ads": {}},
                    },
                },
            },
        }
    message = json_format.ParseDict(
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain],
        },
        listener_pb2.Listener(),
    )
    return make_resource(message)


def secret(name: str, payload: str = "x") -> Resource:
    message = secret_pb2.Secret(name=name)
    message.validation_context.trusted_ca.inline_string = payload
    return make_resource(message)


# -- a local mesh: real Envoy sidecars configured over ADS ---------------------------------------
#: A listener update (an mTLS mode change, or a new kind of authorization filter; rule edits only
#: change the route config) leaves open connections on the old listener until they drain;
#: Envoy's default drains gradually over 600 s. Closing them at the next response keeps tests
#: that change the filter set quick.
ENVOY_DRAIN_ARGS = ("--drain-time-s", "2", "--drain-strategy", "immediate")


class LocalMesh:
    """Echo backends, each behind a real Envoy sidecar that gets everything over ADS (mTLS, SDS)
    from an in-process control plane watching ``policy_dir``. Used by the integration tests and
    the convergence benchmark; everything binds to 127.0.0.1 with kernel-chosen ports.

    ``delta``: refs of the sidecars that use DELTA_GRPC (the others use SotW).
    ``compiler_hook``: wraps each workload's compiled resources (tests inject faults with it).
    """

    def __init__(
        self,
        policy_dir: Any,
        workdir: Any,
        workloads: Any,
        *,
        delta: Any = (),
        svid_ttl: Any = None,
        schedule: Any = None,
        compiler_hook: Any = None,
        drift_threshold: float = 10.0,
        log_level: str = "warning",
        watch_interval: float = 0.1,
        jwks_refresh_interval: float | None = None,
        flows_db: Any = None,
    ) -> None:
        from datetime import timedelta
        from pathlib import Path

        self.policy_dir = Path(policy_dir)
        self.workdir = Path(workdir)
        self.refs = list(workloads)
        self.delta = set(delta)
        self.svid_ttl = svid_ttl or timedelta(hours=1)
        self.schedule = schedule
        self.compiler_hook = compiler_hook
        self.drift_threshold = drift_threshold
        self.log_level = log_level
        self.watch_interval = watch_interval
        self.jwks_refresh_interval = jwks_refresh_interval  # None: meshward.xds.jwks default
        self.flows_db = flows_db  # a flow store: sidecars stream flow logs to the control plane
        self.echoes: dict[str, Any] = {}
        self.envoys: dict[str, Any] = {}
        self.xds: Any = None
        self.ca: Any = None
        self.bindings: dict[str, Any] = {}

    def start(self, timeout: float = 60.0) -> LocalMesh:
        import itertools

        from meshward.certs import CertificateAuthority
        from meshward.compile import CompileOptions, runtime_bindings
        from meshward.demo.echo import EchoServer
        from meshward.envoy import EnvoyProcess
        from meshward.net import free_port
        from meshward.policy import load
        from meshward.xds.bootstrap import AdsCredentials, render_bootstrap
        from meshward.xds.compiler import compiler_for
        from meshward.xds.compiling import WorkloadCompiler
        from meshward.xds.nodeid import NodeId
        from meshward.xds.service import XdsServiceThread

        policy = load([self.policy_dir])
        for ref in self.refs:
            echo = EchoServer(ref.split("/")[1])
            echo.__enter__()
            self.echoes[ref] = echo
        app_ports = {
            (w.ref, p.port): self.echoes[w.ref].port
            for w in policy.workloads
            if w.ref in self.echoes
            for p in w.ports
        }
        supply = (free_port() for _ in itertools.count())
        self.bindings = runtime_bindings(policy.workloads, supply, app_ports=app_ports)
        from meshward.xds.bootstrap import XDS_CLUSTER

        options = CompileOptions(
            bindings=self.bindings,
            listen_host="127.0.0.1",
            access_log_path="/dev/stdout",
            flow_log_cluster=XDS_CLUSTER if self.flows_db is not None else None,
        )
        from meshward.xds.jwks import JwksCache

        jwks = (
            JwksCache(refresh_interval=self.jwks_refresh_interval, retry_interval=0.2)
            if self.jwks_refresh_interval is not None
            else JwksCache()
        )
        compiler: WorkloadCompiler = compiler_for(options, jwks=jwks)
        if self.compiler_hook is not None:
            inner, hook = compiler, self.compiler_hook

            def compiler(policy_set: Any, workload: Any, now: Any) -> Any:
                return hook(workload, list(inner(policy_set, workload, now)))

            # XdsService finds the cache here and keeps it fresh
            compiler.jwks = jwks  # type: ignore[attr-defined]

        self.ca = CertificateAuthority.ephemeral(policy.mesh.trust_domain)
        self.xds = XdsServiceThread(
            None,
            self.ca,
            compiler,
            policy_paths=[self.policy_dir],
            watch_interval=self.watch_interval,
            svid_ttl=self.svid_ttl,
            schedule=self.schedule,
            drift_threshold=self.drift_threshold,
            flows_db=None if self.flows_db is None else str(self.flows_db),
        ).start()
        service = self.xds.service
        roots = self.ca.trust_bundle().roots_pem
        for ref in self.refs:
            workload = policy.workload(ref)
            assert workload is not None, ref
            svid = self.ca.issue(workload.spiffe_id(policy.mesh.trust_domain))
            namespace, name = ref.split("/")
            config = render_bootstrap(
                NodeId(namespace, name),
                "127.0.0.1",
                self.xds.port,
                server_identity=service.server_identity,
                credentials=AdsCredentials(svid.cert_chain_pem, svid.private_key_pem, roots),
                delta=ref in self.delta,
            )
            envoy = EnvoyProcess(
                config,
                name=f"{name}-sidecar",
                workdir=self.workdir / f"{name}-sidecar",
                log_level=self.log_level,
                extra_args=ENVOY_DRAIN_ARGS,
            )
            self.envoys[ref] = envoy
            envoy.start(wait=False)
        for envoy in self.envoys.values():
            envoy.wait_ready(timeout)
        self.wait_converged(timeout=timeout)
        return self

    # -- addresses --------------------------------------------------------------------------------
    def inbound_port(self, ref: str, port: int = 8080) -> int:
        return int(self.bindings[ref].ports[port].listen.port)

    def outbound_port(self, source: str, target: str, port: int = 8080) -> int:
        return int(self.bindings[source].outbound[f"{target}:{port}"].port)

    # -- requests ---------------------------------------------------------------------------------
    def request(
        self,
        source: str,
        target: str,
        path: str = "/",
        *,
        method: str = "GET",
        port: int = 8080,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """``source`` calls ``target`` through its sidecar (outbound listener -> mTLS -> target's
        inbound listener -> target's app): (status, body)."""
        return http_request(
            self.outbound_port(source, target, port), path, method, timeout, headers=headers
        )

    def plaintext(self, target: str, path: str = "/", *, method: str = "GET") -> tuple[int, str]:
        """A client without a sidecar calling ``target``'s inbound listener directly."""
        return http_request(self.inbound_port(target), path, method, 5.0)

    # -- control plane ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.xds.status()
        return result

    def converged(self, policy_version: str | None = None) -> bool:
        status = self.status()
        if policy_version is not None and status["policy"]["version"] != policy_version:
            return False
        nodes = {n["node"]: n for n in status["nodes"]}
        for ref in self.refs:
            node = nodes.get(ref)
            if node is None or not node["connected"]:
                return False
            for stream in node["streams"]:
                if not stream["types"] or not all(t["in_sync"] for t in stream["types"]):
                    return False
        return True

    def wait_converged(self, policy_version: str | None = None, timeout: float = 20.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.converged(policy_version):
                return
            time.sleep(0.05)
        raise TimeoutError(f"mesh did not converge in {timeout}s: {self.status()['nodes']}")

    def access_log(self, ref: str) -> list[dict[str, Any]]:
        import json

        entries = []
        for line in self.envoys[ref].log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
        return entries

    def stop(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()
        if self.xds is not None:
            self.xds.stop()
        for echo in self.echoes.values():
            echo.__exit__(None, None, None)

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_request(
    port: int,
    path: str,
    method: str = "GET",
    timeout: float = 5.0,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[int, str]:
    """(status, body) of one HTTP/1.1 request to 127.0.0.1:port; (0, error) if the connection
    fails (e.g. a plaintext client refused by an mTLS-only listener)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
