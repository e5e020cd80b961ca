"""A cold start's per-node CPU in the control plane's own Python, without gRPC or TLS.

bench/xds_fleet.py --burst-only times a whole 5,005-node cold start, where gRPC core, the
simulated nodes' processes and the machine's other work share two cores: a change of 100 us
per node moves its figures by 0.5 s, inside their run-to-run spread. bench/xds_messages.py
isolates the ADS server's per-message cost, but with SotW nodes, a bare snapshot cache and no
logging: none of what a node's first connection costs. This bench runs what a cold start runs
on the event loop for each node, in one process:

- the real :class:`meshward.xds.controlplane.ControlPlane` on the fleet topology (compiled
  before the clock), the real :class:`meshward.xds.server.AdsServer` over it;
- one stream per node (``--replicas`` per service), opened with the node's client certificate
  in the context's auth context as gRPC gives it (PEM; the replicas of a service share their
  SVID, as in the fleet bench, but nothing is cached by certificate), so authentication, the
  per-identity checks, the node's first snapshot, the fleet table and the connection's INFO
  line (text format, as `xds serve` writes it, to a file) all run;
- a simulated delta node in the same loop, as fleet_nodes.py's: CDS and LDS wildcards, then the
  EDS and RDS names its clusters and listeners reference (read from its snapshot before the
  clock), each response decoded and ACKed. The nodes' work is the same for every variant.

It prints the process's CPU per node (``time.process_time`` from the first stream opened to
every node configured and every ACK read), and with ``--baseline DIR`` the same for the
``meshward`` package in DIR (a ``git archive`` of another commit), interleaved, with the ratios.

    python bench/xds_coldstart.py [--services 200] [--replicas 5] [--rounds 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Appended, not inserted: a child run for --baseline must find that tree's meshward first.
sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.inprocess_ads import InProcessCall
from bench.tree_ab import add_arguments, run_variants

TRUST_DOMAIN = "cluster.local"


class Node(InProcessCall):
    """One simulated delta node: its request stream, and a servicer context whose ``write``
    decodes the response, ACKs it and follows CDS/LDS with the EDS/RDS names they reference."""

    def __init__(self, name: str, pem: bytes, follow: dict[str, list[str]], done: Done) -> None:
        super().__init__(name)
        self.pem = pem
        self.follow = follow  # CDS -> its EDS names, LDS -> its RDS names
        self.done = done
        self.missing: set[str] = set()

    def request(
        self, type_url: str, subscribe: tuple[str, ...] = (), nonce: str = "", first: bool = False
    ) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        message = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=subscribe, response_nonce=nonce
        )
        if first:
            message.node.id = self.name
        self.requests.put_nowait(message)

    # -- the servicer context -------------------------------------------------------------------
    def auth_context(self) -> dict[str, Any]:
        return {"x509_pem_cert": [self.pem], "transport_security_type": [b"ssl"]}

    async def write(self, data: bytes) -> None:
        from envoy.service.discovery.v3 import discovery_pb2

        response = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
        type_url = response.type_url
        for item in response.resources:  # decoded before the ACK, as Envoy does
            item.resource.value  # noqa: B018
        self.request(type_url, nonce=response.nonce)
        names = self.follow.pop(type_url, None)
        if names:
            from meshward.xds import typeurls

            follow = typeurls.ENDPOINT if type_url == typeurls.CLUSTER else typeurls.ROUTE
            self.request(follow, tuple(names))
        self.missing.discard(type_url)
        if not self.missing:
            self.done.configured(self.name)


class Done:
    """The nodes not configured yet (a response of every type they need)."""

    def __init__(self, names: list[str]) -> None:
        self.left = set(names)
        self.event = asyncio.Event()

    def configured(self, name: str) -> None:
        self.left.discard(name)
        if not self.left:
            self.event.set()


def log_to(path: Path) -> None:
    """`xds serve --log-format text`'s logging (meshward.xds.cli), into a file; with the
    record switches its tree's `xds serve` sets, if any (``lean_records``, since session 9)."""
    import logging

    from meshward.telemetry import logging as telemetry_logging

    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    lean = getattr(telemetry_logging, "lean_records", None)
    if lean is not None:
        lean()


async def run(services: int, replicas: int, log_path: Path) -> dict[str, Any]:
    from datetime import timedelta

    from meshward.certs import CertificateAuthority
    from meshward.compile import CompileOptions
    from meshward.testing import topology
    from meshward.xds import heap, typeurls
    from meshward.xds.compile_adapter import compiler_for
    from meshward.xds.controlplane import ControlPlane
    from meshward.xds.limits import NodeLimits
    from meshward.xds.nodeid import NodeId
    from meshward.xds.server import AdsServer

    ps = topology.fleet(services)
    ca = CertificateAuthority.ephemeral(ps.mesh.trust_domain)
    limits = NodeLimits(max_instances=100_000, max_streams=100_000)
    options = CompileOptions(access_log_path=None, listen_host="127.0.0.1")
    control = ControlPlane(
        ps, ca, compiler_for(options), svid_ttl=timedelta(hours=1), reload_ca=False, limits=limits
    )
    server = AdsServer(control, limits=limits)
    refs = sorted(w.ref for w in ps.workloads)
    names = [f"{ref}/r{r}" for ref in refs for r in range(replicas)]
    pems: dict[str, bytes] = {}
    for ref in refs:  # one SVID per service, as the fleet bench's replicas share theirs
        identity = control.expected_identity(NodeId.parse(ref))
        chain = ca.issue(identity).cert_chain_pem
        pems[ref] = chain[: chain.index(b"-----END CERTIFICATE-----") + 26]
    follows: dict[str, dict[str, list[str]]] = {}
    for ref in refs:  # what a node of ``ref`` subscribes to after CDS and LDS
        config = control.configs[ref]
        clusters = config.resources.get(typeurls.CLUSTER, [])
        listeners = config.resources.get(typeurls.LISTENER, [])
        follows[ref] = {
            typeurls.CLUSTER: sorted({n for r in clusters for n in r.endpoints}),
            typeurls.LISTENER: sorted({n for r in listeners for n in r.routes}),
        }
    done = Done(names)
    sims = []
    for name in names:
        ref = name.rsplit("/", 1)[0]
        follow = {t: list(ns) for t, ns in follows[ref].items() if ns}
        node = Node(name, pems[ref], follow, done)
        node.missing = {typeurls.CLUSTER, typeurls.LISTENER} | {
            typeurls.ENDPOINT if t == typeurls.CLUSTER else typeurls.ROUTE for t in follow
        }
        sims.append(node)
    resources = sum(len(v) for c in control.configs.values() for v in c.resources.values())
    log_to(log_path)
    heap.freeze()  # as the control plane does once the first compile is in (meshward.xds.heap)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    tasks = []
    for node in sims:
        node.request(typeurls.CLUSTER, first=True)
        node.request(typeurls.LISTENER)
        tasks.append(asyncio.create_task(server.serve("delta", node.stream(), node)))
    await asyncio.wait_for(done.event.wait(), 900)
    while any(not n.requests.empty() for n in sims) or any(
        not s.queue.empty() for s in server.streams.values()
    ):
        await asyncio.sleep(0.005)
    cold, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for node in sims:
        node.requests.put_nowait(None)
    await asyncio.gather(*tasks)
    await server.stop()
    return {
        "nodes": len(names),
        "resources_per_workload": round(resources / max(1, len(control.configs)), 1),
        "cold_us_per_node": round(cold * 1e6 / len(names), 1),
        "wall_s": round(wall, 2),
        "log_lines": sum(1 for _ in log_path.open()),
    }


def child(services: int, replicas: int) -> None:
    with tempfile.TemporaryDirectory(prefix="meshward-coldstart-") as tmp:
        result = asyncio.run(run(services, replicas, Path(tmp) / "server.log"))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: git archive BASE meshward | tar -x -C /tmp/base; "
        "python bench/xds_coldstart.py --baseline /tmp/base",
    )
    parser.add_argument("--services", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=5)
    add_arguments(parser)
    args = parser.parse_args()
    if args.services < 1 or args.replicas < 1 or args.rounds < 1:
        parser.error("--services, --replicas and --rounds must be at least 1")
    if args.child:
        child(args.services, args.replicas)
        return
    child_args = ["--services", str(args.services), "--replicas", str(args.replicas)]
    results = run_variants(parser, args, __file__, child_args)
    if args.json:
        return
    first = results["this"][0]
    print(
        f"fleet {args.services} services x {args.replicas} replicas = {first['nodes']} nodes, "
        f"{first['resources_per_workload']} resources per workload; "
        f"median of {args.rounds} (interleaved), process CPU per node, cold start"
    )
    medians = {}
    for name, runs in results.items():
        values = [r["cold_us_per_node"] for r in runs]
        medians[name] = statistics.median(values)
        print(f"  {name:5s} {medians[name]:8.1f} us/node   runs: {values}")
    if "base" in medians:
        print(f"  this / base: {medians['this'] / medians['base']:.2f}")


if __name__ == "__main__":
    main()
