"""The docker-compose topology's generated files (``sidecar-config/``), rendered from the example
policies so they cannot drift from them (tests compare the committed files with this output).

- No sidecar bootstraps: each sidecar is a ``meshward agent`` (:func:`agent_argv`) that renders
  its Envoy's bootstrap itself; its one-time join token is minted at run time into
  ``certs/join/`` by the compose file's one-shot ``credentials`` service.
- ``bindings.json``: where each sidecar listens (``meshward xds serve --bindings``). Every app
  container has a fixed address on the compose network, because Envoy's EDS endpoints and the
  compiled ext_authz/OTLP clusters take IP addresses, not names. The app listens on
  127.0.0.1:9080 inside its network namespace, which its sidecar shares; the sidecar takes the
  declared port 8080 on every interface, and one outbound listener per peer on
  ``0.0.0.0:<15100 + peer index>`` (the same port for a peer in every container) so the ``tour``
  container can call *as* a workload. That exposure is for the demo only: in production the
  outbound listeners stay on loopback.
- ``tour.json``: the :class:`~meshward.demo.state.DemoState` the ``tour`` service runs against.

Regenerate with ``python -m meshward.demo.compose`` (from the repository root).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meshward.demo.state import DemoState, WorkloadState, split_outbound

NETWORK = "10.77.0.0/24"
JAEGER_IP, XDS_IP, EXTAUTHZ_IP = "10.77.0.2", "10.77.0.3", "10.77.0.4"
FIRST_APP_IP = 11  # 10.77.0.11, .12, ... in sorted workload order
APP_PORT = 9080  # the echo app, on 127.0.0.1 inside its network namespace
OUTBOUND_BASE = 15100
XDS = "xds:15010"
JOIN = "xds:15012"  # `xds serve --join-listen`
JOIN_DIR = "/etc/meshward/join"  # ./certs/join: <name>.token and root.pem, by `credentials`
AGENT_DIR = "/var/lib/meshward/agent"  # a named volume per sidecar: its key and SVID persist
AGENT_HEALTH = "127.0.0.1:15021"  # in the app's network namespace
XDS_ADMIN_PORT = 15011
EXTAUTHZ_PORT, EXTAUTHZ_METRICS_PORT = 9191, 9192
ACCESS_LOG = "/var/log/meshward/access.log"  # in each sidecar container (a named volume)
DECISION_LOG = "/var/log/meshward/decisions.jsonl"  # in the extauthz container
EXTAUTHZ_TLS_DIR = "/etc/meshward/extauthz"  # its SVID (./certs/extauthz, by `credentials`)
POLICY_DIR = "/policies"  # a named volume filled from examples/ by the `policies` service
EXAMPLES_IN_IMAGE = "/app/examples"


def agent_argv(ref: str) -> list[str]:
    """A sidecar container's command: ``meshward agent`` for ``ref``."""
    name = ref.split("/")[1]
    return [
        "meshward", "agent", "--workload", ref, "--xds", XDS, "--join", JOIN,
        "--join-token-file", f"{JOIN_DIR}/{name}.token", "--root-cert", f"{JOIN_DIR}/root.pem",
        "--dir", AGENT_DIR, "--health-listen", AGENT_HEALTH,
        "--envoy-arg=--drain-time-s", "--envoy-arg=5",
        "--envoy-arg=--drain-strategy", "--envoy-arg=immediate",
    ]  # fmt: skip


def app_ips(refs: list[str]) -> dict[str, str]:
    return {ref: f"10.77.0.{FIRST_APP_IP + i}" for i, ref in enumerate(sorted(refs))}


def outbound_ports(refs: list[str]) -> dict[str, int]:
    return {ref: OUTBOUND_BASE + 1 + i for i, ref in enumerate(sorted(refs))}


def bindings(policy: Any) -> dict[str, Any]:
    """The ``--bindings`` JSON for the compose network (``meshward xds serve --help``)."""
    refs = sorted(w.ref for w in policy.workloads)
    ips, ports = app_ips(refs), outbound_ports(refs)
    result: dict[str, Any] = {}
    for w in sorted(policy.workloads, key=lambda w: w.ref):
        result[w.ref] = {
            "ports": {
                str(p.port): {
                    "listen": f"0.0.0.0:{p.port}",
                    "app": f"127.0.0.1:{APP_PORT}",
                    "advertise": f"{ips[w.ref]}:{p.port}",
                }
                for p in sorted(w.ports, key=lambda p: p.port)
            },
            "outbound": {
                f"{peer}:{p.port}": f"0.0.0.0:{ports[peer]}"
                for peer in refs
                if peer != w.ref
                for p in sorted(policy.workload(peer).ports, key=lambda p: p.port)
            },
        }
    return result


def tour_state(policy: Any) -> DemoState:
    """The compose mesh as the tour (and `meshward denials --state`) sees it from its container."""
    refs = sorted(w.ref for w in policy.workloads)
    ips, ports = app_ips(refs), outbound_ports(refs)
    workloads = {}
    for ref in refs:
        w = policy.workload(ref)
        name = w.name
        # The tour calls as `ref` through ref's sidecar, reached at the app's address.
        listened, unlistened = split_outbound(
            policy,
            ref,
            {
                f"{peer}:{policy.workload(peer).ports[0].port}": f"{name}:{ports[peer]}"
                for peer in refs
                if peer != ref
            },
        )
        workloads[ref] = WorkloadState(
            ref=ref,
            spiffe_id=w.spiffe_id(policy.mesh.trust_domain),
            inbound=f"{ips[ref]}:{w.ports[0].port}",
            app=f"127.0.0.1:{APP_PORT}",
            outbound=listened,
            unlistened=unlistened,
            access_log=f"/logs/{name}.{w.namespace}/access.log",
            admin=None,
        )
    return DemoState(
        kind="compose",
        policy_dir=POLICY_DIR,
        xds_admin=f"http://xds:{XDS_ADMIN_PORT}",
        ads=XDS,
        extauthz=f"extauthz:{EXTAUTHZ_PORT}",
        extauthz_metrics=f"http://extauthz:{EXTAUTHZ_METRICS_PORT}",
        decision_log="/logs/extauthz/decisions.jsonl",
        workloads=workloads,
        signing_key=f"{EXAMPLES_IN_IMAGE}/demo-keys/jwt-signing-key.pem",
        otlp="jaeger:4317",
        running=True,
    )


def render(policy: Any) -> dict[str, str]:
    """``sidecar-config/`` files other than the bootstraps: name -> text."""
    return {
        "bindings.json": json.dumps(bindings(policy), indent=2, sort_keys=True) + "\n",
        "tour.json": json.dumps(tour_state(policy).to_json(), indent=2, sort_keys=True) + "\n",
    }


def write(root: Path) -> list[Path]:
    """Regenerate ``root/sidecar-config`` from ``root/examples``; return the files written."""
    from meshward.policy import load

    policy = load([root / "examples"])
    out = root / "sidecar-config"
    out.mkdir(exist_ok=True)
    written = []
    for name, text in render(policy).items():
        (out / name).write_text(text)
        written.append(out / name)
    return written


if __name__ == "__main__":
    for path in write(Path.cwd()):
        print(f"wrote {path}")
