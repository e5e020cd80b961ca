"""Per-node control-plane CPU at fleet scale, under `meshward agent` (`xds serve --secrets agent`).

Nodes hold their SVIDs (the agent's); the control plane serves CDS/LDS/EDS/RDS only. Three
phases against the real `meshward xds serve` process, with the simulated nodes
(meshward.testing.ads_client, subscribing like an agent-mode Envoy: CDS/LDS wildcard, then the
EDS/RDS names they reference; no SDS over ADS) in a process of their own:

- first connection: every node connects in one burst with nothing (all config sent);
- mesh-wide edit: a root-namespace DENY changes every node's inbound route (compile included);
- restart: the control plane is stopped and started again and every node reconnects holding
  its config (SotW ``version_info`` per type, as Envoy does): the cold start that matters for a
  running fleet. Versions are content digests, so a node in sync is sent nothing.

Server CPU is read from /proc per thread: ``loop`` is the event loop (every stream's Python
work), ``grpc`` gRPC core's threads (TLS handshakes, socket I/O), ``other`` the rest (the compile
and watcher threads). ``--server-path DIR,DIR`` runs the server from other checkouts (e.g. an
older commit's ``git archive``), interleaved with rounds, to compare code side by side; its
``--secrets agent`` (the default since f087831) stays spelled out so that a checkout from before
then runs in the same mode. The server's command line and the /proc readings are
meshward.testing.bench_server's, shared with bench/xds_fleet.py.

    python bench/xds_restart.py --services 300 --replicas 3 [--rounds 2] [--server-path A,B]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.xds_fleet import mesh_wide_edit, write_policy
from meshward.testing.bench_server import BenchServer
from meshward.testing.processes import Launcher


def prepare(work: Path, services: int, replicas: int) -> tuple[Any, list[str]]:
    """CA, one SVID per service (replicas share it), one policy file per namespace."""
    from meshward.certs import CertificateAuthority
    from meshward.testing import topology

    ps = topology.fleet(services)
    ca = CertificateAuthority.init(work / "ca", ps.mesh.trust_domain)
    creds = work / "creds"
    nodes = []
    for w in ps.workloads:
        svid = ca.issue(w.spiffe_id(ps.mesh.trust_domain))
        directory = creds / w.namespace / w.name
        directory.mkdir(parents=True)
        (directory / "cert.pem").write_bytes(svid.cert_chain_pem)
        (directory / "key.pem").write_bytes(svid.private_key_pem)
        nodes += [f"{w.ref}/r{i}" for i in range(replicas)]
    (creds / "ca.pem").write_bytes(ca.trust_bundle().roots_pem)
    (work / "policies").mkdir(exist_ok=True)
    write_policy(work / "policies", ps)
    (work / "nodes.json").write_text(json.dumps(nodes))
    return ps, nodes


def start_server(launcher: Launcher, work: Path, path: str | None) -> BenchServer:
    """The server under test (log ``server.log``), from ``path``'s checkout if given."""
    return BenchServer(launcher, work, name="server", python_path=path)


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


class Nodes:
    """The simulated nodes' process, driven over stdin/stdout JSON lines."""

    def __init__(self, launcher: Launcher, work: Path, identity: str) -> None:
        argv = [sys.executable, __file__, "--nodes", str(work), identity]
        self.worker = launcher.launch("nodes", argv, pipe_stdin=True, pipe_stdout=True)

    def answer(self) -> dict[str, Any]:
        line = self.worker.readline()
        if not line:
            raise RuntimeError(f"nodes: died; last log lines:\n{self.worker.log()[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"nodes: {answer['error']}")
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        self.worker.write(command + "\n")
        return self.answer()

    def stop(self) -> None:
        self.worker.kill()


def nodes_main(work: Path, identity: str) -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    import meshward.compile.protos  # noqa: F401  (registers every type inside the resources)
    from meshward.certs.client_tls import client_ssl_context
    from meshward.testing.ads_client import AdsClient
    from meshward.xds import typeurls as t

    creds = work / "creds"
    roots = (creds / "ca.pem").read_bytes()
    names: list[str] = json.loads((work / "nodes.json").read_text())
    contexts: dict[tuple[str, str], Any] = {}
    clients: list[AdsClient] = []
    tasks: list[asyncio.Task[None]] = []
    routes: dict[str, int] = {}
    responses = [0]

    def on_response(client: AdsClient, type_url: str, response: Any) -> None:
        responses[0] += 1
        if type_url == t.ROUTE:
            routes[client.node_id] = routes.get(client.node_id, 0) + 1
        if type_url == t.CLUSTER:  # follow EDS like Envoy
            eds = []
            for packed in client.view(t.CLUSTER).resources.values():
                cluster = cluster_pb2.Cluster()
                packed.Unpack(cluster)
                if cluster.HasField("eds_cluster_config"):
                    eds.append(cluster.eds_cluster_config.service_name or cluster.name)
            if tuple(sorted(eds)) != client.subscriptions.get(t.ENDPOINT, ()):
                client.subscribe(t.ENDPOINT, sorted(eds))

    def configured(c: AdsClient) -> bool:
        return all(c.view(x).responses for x in (t.CLUSTER, t.LISTENER, t.ROUTE)) and (
            not c.subscriptions.get(t.ENDPOINT) or bool(c.view(t.ENDPOINT).responses)
        )

    async def until(done: Any, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            failed = [c for c in clients if c.error is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} nodes failed: {failed[0].error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("nodes not done")
            await asyncio.sleep(0.05)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = (await reader.readline()).decode().strip()
            if not line:
                return
            command, _, arg = line.partition(" ")
            try:
                if command == "connect":
                    for node in names:
                        key = (node.split("/")[0], node.split("/")[1])
                        if key not in contexts:
                            d = creds / key[0] / key[1]
                            contexts[key] = client_ssl_context(
                                (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes(), roots
                            )
                        client = AdsClient(
                            "127.0.0.1", int(arg), node, contexts[key], server_identity=identity,
                            subscriptions={t.CLUSTER: (), t.LISTENER: ()},
                            on_response=on_response, follow_routes=True,
                        )  # fmt: skip
                        clients.append(client)
                        tasks.append(asyncio.create_task(client.run()))
                        await asyncio.sleep(0)  # a burst
                    await until(lambda: all(configured(c) for c in clients))
                    answer: dict[str, Any] = {"wall": time.time()}
                elif command == "edited":  # every node got a new route configuration
                    mark = dict(routes)
                    print(json.dumps({"marked": True}), flush=True)
                    await until(lambda mark=mark: all(
                        routes.get(c.node_id, 0) > mark.get(c.node_id, 0) for c in clients
                    ))  # fmt: skip
                    answer = {"wall": time.time()}
                elif command == "reconnect":  # the server restarted: every stream ended
                    await asyncio.gather(*tasks, return_exceptions=True)
                    tasks.clear()
                    responses[0] = 0
                    for client in clients:
                        client.port = int(arg)
                        client.connected.clear()
                        tasks.append(asyncio.create_task(client.run()))
                        await asyncio.sleep(0)
                    await asyncio.gather(*(c.connected.wait() for c in clients))
                    answer = {"wall": time.time()}
                elif command == "responses":
                    answer = {"responses": responses[0]}
                else:
                    answer = {"error": f"unknown command {line}"}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)

    asyncio.run(serve())


def run(services: int, replicas: int, path: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meshward-bench-restart-") as tmp:
        work = Path(tmp)
        ps, names = prepare(work, services, replicas)
        n = len(names)
        launcher = Launcher(work, quiet=True, logs=work)  # logs: server.log, nodes.log
        server = start_server(launcher, work, path)
        nodes = Nodes(launcher, work, server.identity)
        try:
            cpu, start = server.cpu_by_thread(), time.time()
            first_wall = nodes.ask(f"connect {server.ads_port}")["wall"] - start
            first = spent(cpu, server.cpu_by_thread())
            cpu, start = server.cpu_by_thread(), time.time()
            nodes.ask("edited")  # marks, then waits below
            write_policy(work / "policies", mesh_wide_edit(ps))
            mesh_wall = nodes.answer()["wall"] - start
            mesh = spent(cpu, server.cpu_by_thread())
            server.stop()
            server = start_server(
                launcher, work, path
            )  # restarted: the same (edited) policy and CA
            cpu, start = server.cpu_by_thread(), time.time()
            nodes.ask(f"reconnect {server.ads_port}")
            while True:  # every node reconnected and in sync
                fleet = server.status()["fleet"]
                if fleet["connected"] == n and fleet["in_sync"] == n:
                    break
                time.sleep(0.5)
            restart_wall = time.time() - start
            restart = spent(cpu, server.cpu_by_thread())
            sent = nodes.ask("responses")["responses"]
            return {"nodes": n, "first": first, "first_wall": first_wall, "mesh": mesh,
                    "mesh_wall": mesh_wall, "restart": restart, "restart_wall": restart_wall,
                    "restart_responses": sent}  # fmt: skip
        finally:
            nodes.stop()
            launcher.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=300)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--server-path", default="", help="comma-separated PYTHONPATHs for the server (default: this checkout)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON line per run")
    parser.add_argument("--nodes", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nodes:
        nodes_main(Path(args.nodes[0]), args.nodes[1])
        return
    paths = args.server_path.split(",") if args.server_path else [""]
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
    for _ in range(args.rounds):
        for path in paths:  # interleaved
            result = run(args.services, args.replicas, path or None)
            results[path].append(result)
            if args.json:
                print(json.dumps({"server_path": path or ".", **result}), flush=True)
    print(f"fleet {args.services} services x {args.replicas} replicas, --secrets agent, "
          f"{args.rounds} round(s), medians; server CPU ms per node: loop / gRPC threads / other")  # fmt: skip
    print(f"{'server':>24} {'nodes':>6} {'first connect':>22} {'mesh-wide edit':>22} {'restart':>22} {'sent':>5}")  # fmt: skip
    for path, runs in results.items():
        n = runs[0]["nodes"]

        def cell(phase: str, runs: list[dict[str, Any]] = runs, n: int = n) -> str:
            ms = [
                statistics.median(r[phase][k] for r in runs) * 1000 / n
                for k in ("loop", "grpc", "other")
            ]
            wall = statistics.median(r[f"{phase}_wall"] for r in runs)
            return f"{ms[0]:.2f}/{ms[1]:.2f}/{ms[2]:.2f} {wall:5.1f}s"

        sent = statistics.median(r["restart_responses"] for r in runs)
        print(f"{(path or '.')[-24:]:>24} {n:6d} {cell('first'):>22} {cell('mesh'):>22} {cell('restart'):>22} {sent:5.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
