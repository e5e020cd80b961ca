"""The control plane at fleet scale: realistic topologies, every node a distinct-enough sidecar.

Against the real `meshward xds serve` process (mTLS, policy watcher), with simulated nodes in a
separate process that behave like Envoy on the wire: CDS and LDS as wildcards, then the EDS and
RDS names the clusters and listeners reference, SDS for their secrets; every response decoded
(each resource unpacked to its type) before it is ACKed. Topologies (meshward.testing.topology):

- fleet: N distinct services x R replicas in namespaces of 30; each service callable by ~10
  others named by principal, plus namespace-wide rules (monitoring ALLOW, same-namespace GETs,
  DENY /admin from outside);
- worst: one namespace of N services and one namespace-wide ALLOW (every sidecar gets every
  peer: bytes delivered grow with N^2 whatever compile does).

Sizes are interleaved (round 1 of every size, then round 2, ...). Per size it prints: cold start
(server start to every node configured), a one-policy edit converged at the affected nodes, a
mesh-wide edit (a root-namespace DENY) converged at every node, server CPU per change and per
delivered resource, server RSS per node and per service, and the longest stall of a probe
stream during the mesh-wide recompile (the probe, in a process of its own, changes its RDS
subscription every 10 ms and times each answer).

    python bench/xds_fleet.py [--topology fleet] [--services 100,300] [--replicas 2] [--rounds 1]

``/status s`` times the default summary, ``nodes s`` every node's document (``?view=nodes``, page
by page, as `meshward status` reads it). ``--burst-only``: only the cold start, every node at
once, failed streams retried after 500 ms like Envoy and counted by error (one JSON line per
size). The server runs with per-identity limits raised: simulated replicas share their
service's certificate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WATCH_INTERVAL = 0.05
PROBE_NAME = "meshward-probe-route"


def policy_set(topology: str, services: int) -> Any:
    from meshward.testing import topology as topo

    return topo.worst_case(services) if topology == "worst" else topo.fleet(services)


def policy_files(ps: Any) -> dict[str, str]:
    """One file per namespace (and one for the MeshConfig), as a policy repository is laid
    out: an edit changes one file, which is what the watcher's per-file loading is for."""
    from meshward.policy import canonical

    groups: dict[str, list[dict[str, Any]]] = {}
    for doc in ps.canonical_documents():
        name = "_mesh" if doc["kind"] == "MeshConfig" else doc["metadata"]["namespace"]
        groups.setdefault(name, []).append(doc)
    return {f"{name}.yaml": canonical.dump_documents(docs) for name, docs in groups.items()}


def write_policy(directory: Path, ps: Any) -> int:
    """Write the files whose text changed (each atomically); returns how many."""
    written = 0
    for name, text in policy_files(ps).items():
        target = directory / name
        if target.exists() and target.read_text() == text:
            continue
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(target)
        written += 1
    return written


def one_policy_edit(ps: Any) -> tuple[Any, str]:
    """The methods of one service's ALLOW: (new policy set, the callee's ref)."""
    from meshward.policy.model import Operation
    from meshward.policy.policyset import PolicySet

    policies = list(ps.authorization_policies)
    target = (
        next(p for p in policies if p.selector is not None) if len(policies) > 1 else policies[0]
    )
    rule = target.rules[0]
    edited = dataclasses.replace(
        target, rules=(dataclasses.replace(rule, operations=(Operation(methods=("PUT",)),)),)
    )
    policies[policies.index(target)] = edited
    new = PolicySet.create(mesh=ps.mesh, workloads=ps.workloads, authorization_policies=policies)
    callee = f"{target.namespace}/{target.selector['app']}" if target.selector is not None else None
    return new, callee or "*"


def mesh_wide_edit(ps: Any) -> Any:
    from meshward.policy.model import Action, AuthorizationPolicy, Operation, Rule
    from meshward.policy.policyset import PolicySet

    deny = AuthorizationPolicy(
        namespace=ps.mesh.root_namespace,
        name="deny-debug",
        action=Action.DENY,
        rules=(Rule(operations=(Operation(paths=("/debug", "/debug/*")),)),),
    )
    return PolicySet.create(
        mesh=ps.mesh,
        workloads=ps.workloads,
        authorization_policies=[*ps.authorization_policies, deny],
    )


# -- the server process -----------------------------------------------------------------------
class Server:
    def __init__(self, work: Path) -> None:
        self.ready = work / "server.ready.json"
        self.log = work / "server.log"
        argv = [
            sys.executable, "-m", "meshward", "xds", "serve",
            "--policy", str(work / "policies"), "--ca", str(work / "ca"),
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--access-log", "off",
            "--watch-interval", str(WATCH_INTERVAL), "--ready-file", str(self.ready),
            "--listen-host", "127.0.0.1", "--log-format", "text",
            # Simulated replicas share their service's identity (one certificate per service):
            # per-identity limits sized for real sidecars would refuse a burst of them.
            "--max-instances", "100000", "--max-streams", "100000",
            "--svid-rate", "100000", "--svid-burst", "100000",
        ]  # fmt: skip
        self.started = time.time()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"xds server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        info = json.loads(self.ready.read_text())
        self.ads_port = int(info["ads"].rsplit(":", 1)[1])
        self.admin = info["admin"]
        self.identity = info["server_identity"]

    def status_seconds(self) -> tuple[float, float, float]:
        """(GET /status: the summary; every node's document, /status?view=nodes page by page,
        as `meshward status` reads it; a /metrics scrape)."""
        import urllib.request

        from meshward.xds.status_cli import fetch_nodes

        start = time.perf_counter()
        with urllib.request.urlopen(self.admin + "/status", timeout=120) as response:
            response.read()
        summary = time.perf_counter() - start
        start = time.perf_counter()
        fetch_nodes(self.admin, 120, ())
        nodes = time.perf_counter() - start
        start = time.perf_counter()
        with urllib.request.urlopen(self.admin + "/metrics", timeout=120) as response:
            response.read()
        return summary, nodes, time.perf_counter() - start

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Worker:
    """The simulated nodes' process, driven over stdin/stdout JSON lines."""

    def __init__(self, work: Path, server: Server) -> None:
        argv = [
            sys.executable,
            __file__,
            "--worker",
            str(work),
            str(server.ads_port),
            server.identity,
        ]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died on {command!r}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker: {answer['error']}")
        return answer

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prepare(work: Path, ps: Any, replicas: int) -> list[str]:
    """CA, one SVID per service, the policy file; returns the node ids."""
    from meshward.certs import CertificateAuthority

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
    (work / "policies").mkdir()
    write_policy(work / "policies", ps)
    (work / "nodes.json").write_text(json.dumps(nodes))
    return nodes


def run_size(topology: str, services: int, replicas: int) -> dict[str, Any]:
    ps = policy_set(topology, services)
    with tempfile.TemporaryDirectory(prefix="meshward-bench-fleet-") as tmp:
        work = Path(tmp)
        nodes = prepare(work, ps, replicas)
        t0 = time.time()
        server = Server(work)
        rss0 = server.rss_mb()  # compiled, no node connected yet
        worker = Worker(work, server)
        # The probe in a process of its own: its answers are timed without waiting behind the
        # simulated nodes' decoding (in the nodes' process, that delay was part of the stall).
        prober = Worker(work, server)
        try:
            connected = worker.ask("connect")
            cold = connected["all_configured_wall"] - t0
            cpu_cold = server.cpu_seconds()
            rss = server.rss_mb()
            resources_cold = connected["resources"]
            # One policy: the affected nodes are the callee's replicas.
            edited, callee = one_policy_edit(ps)
            affected = [n for n in nodes if callee == "*" or n.startswith(callee + "/")]
            worker.ask("mark")
            cpu0, start = server.cpu_seconds(), time.time()
            write_policy(work / "policies", edited)
            one = worker.ask(f"wait {json.dumps(affected)} 120")
            time.sleep(1.0)  # anything else pushed would have arrived by now
            touched = worker.ask("touched")["nodes"]
            one_cpu = server.cpu_seconds() - cpu0
            # Mesh-wide: a root-namespace DENY changes every node's inbound route.
            worker.ask("mark")
            prober.ask("probe on")
            cpu0, start2 = server.cpu_seconds(), time.time()
            write_policy(work / "policies", mesh_wide_edit(edited))
            mesh = worker.ask(f"wait {json.dumps(nodes)} 600")
            mesh_cpu = server.cpu_seconds() - cpu0
            probe = prober.ask("probe off")
            status, status_nodes, metrics = server.status_seconds()
            return {
                "nodes": len(nodes),
                "services": len(ps.workloads),
                "cold": cold,
                "cold_cpu": cpu_cold,
                "resources_cold": resources_cold,
                "rss": rss,
                "rss0": rss0,
                "one": one["last_wall"] - start,
                "one_nodes": len(affected),
                "one_touched": touched,
                "one_cpu": one_cpu,
                "mesh": mesh["last_wall"] - start2,
                "mesh_cpu": mesh_cpu,
                "mesh_resources": mesh["resources"],
                "stall": probe["max_stall"],
                "probes": probe["answers"],
                "status": status,
                "status_nodes": status_nodes,
                "metrics": metrics,
            }
        finally:
            prober.stop()
            worker.stop()
            server.stop()


def run_burst(topology: str, services: int, replicas: int) -> dict[str, Any]:
    """Only the cold start: every node connects at once; failed streams are retried after
    500 ms (as Envoy does) and counted by error, and the server log is searched for what it
    says about them."""
    ps = policy_set(topology, services)
    with tempfile.TemporaryDirectory(prefix="meshward-bench-burst-") as tmp:
        work = Path(tmp)
        nodes = prepare(work, ps, replicas)
        t0 = time.time()
        server = Server(work)
        worker = Worker(work, server)
        try:
            connected = worker.ask("connect retry")
            status, status_nodes, metrics = server.status_seconds()
            log = server.log.read_text(errors="replace")
            if os.environ.get("MESHWARD_BENCH_KEEP_LOG"):
                Path(os.environ["MESHWARD_BENCH_KEEP_LOG"]).write_text(log)
            words = ("cancel", "refused", "not read", "Traceback", "reset", "timed out")
            return {
                "nodes": len(nodes),
                "cold": connected["all_configured_wall"] - t0,
                "failures": connected["failures"],
                "failure_times (started s, lasted s, types received)": connected["failure_times"],
                "server_log": {w: log.count(w) for w in words},
                "rss": server.rss_mb(),
                "status": status,
                "status_nodes": status_nodes,
                "metrics": metrics,
            }
        finally:
            worker.stop()
            server.stop()


# -- the simulated nodes ------------------------------------------------------------------------
def worker_main(work: Path, port: int, identity: str) -> None:
    from google.protobuf import descriptor_pool, message_factory

    import meshward.compile.protos  # noqa: F401  (registers every type inside the resources)
    from meshward.certs.client_tls import client_ssl_context
    from meshward.testing.ads_client import AdsClient
    from meshward.xds import typeurls

    creds = work / "creds"
    roots = (creds / "ca.pem").read_bytes()
    nodes: list[str] = json.loads((work / "nodes.json").read_text())
    contexts: dict[str, Any] = {}
    clients: list[AdsClient] = []
    tasks: list[asyncio.Task[None]] = []
    route_count: dict[str, int] = {}
    last_route: dict[str, float] = {}
    any_count: dict[str, int] = {}
    delivered = [0]
    marked: dict[str, Any] = {"routes": {}, "any": {}, "delivered": 0}
    probe: dict[str, Any] = {"on": False, "sent": 0.0, "max": 0.0, "answers": 0, "toggle": False}

    def decode(type_url: str, response: Any) -> str | None:
        """Decode every resource before ACKing, as Envoy does."""
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_url.split("/", 1)[1])
        cls = message_factory.GetMessageClass(descriptor)
        for packed in response.resources:
            if not packed.Unpack(cls()):
                return f"cannot decode a {type_url}"
        return None

    def on_response(client: AdsClient, type_url: str, response: Any) -> None:
        node = client.node_id
        any_count[node] = any_count.get(node, 0) + 1
        delivered[0] += len(response.resources)
        if type_url == typeurls.ROUTE:
            route_count[node] = route_count.get(node, 0) + 1
            last_route[node] = time.time()
        if type_url == typeurls.CLUSTER:  # follow EDS like Envoy: the clusters' service names
            from envoy.config.cluster.v3 import cluster_pb2

            names = []
            for packed in client.view(typeurls.CLUSTER).resources.values():
                cluster = cluster_pb2.Cluster()
                packed.Unpack(cluster)
                if cluster.HasField("eds_cluster_config"):
                    names.append(cluster.eds_cluster_config.service_name or cluster.name)
            names.sort()
            if tuple(names) != client.subscriptions.get(typeurls.ENDPOINT, ()):
                client.subscribe(typeurls.ENDPOINT, names)
        if node.endswith("/probe") and type_url == typeurls.ROUTE and probe["sent"]:
            probe["max"] = max(probe["max"], time.monotonic() - probe["sent"])
            probe["answers"] += 1
            probe["sent"] = 0.0

    def new_client(node: str) -> AdsClient:
        ns, name = node.split("/")[:2]
        if (ns, name) not in contexts:
            d = creds / ns / name
            contexts[ns, name] = client_ssl_context(
                (d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes(), roots
            )
        return AdsClient(
            "127.0.0.1", port, node, contexts[ns, name], server_identity=identity,
            subscriptions={typeurls.CLUSTER: (), typeurls.LISTENER: (),
                           typeurls.SECRET: ("default", "ROOTCA")},
            nack=decode, on_response=on_response, follow_routes=True,
        )  # fmt: skip

    def configured(c: AdsClient) -> bool:
        return all(
            c.view(t).responses for t in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE, typeurls.SECRET)
        ) and (not c.subscriptions.get(typeurls.ENDPOINT) or bool(c.view(typeurls.ENDPOINT).responses))

    failures: dict[str, int] = {}

    burst_start = [0.0]

    async def again(client: AdsClient) -> None:
        """Reconnect after a failure, as Envoy does (its ADS backoff starts at 500 ms)."""
        while True:
            began = time.monotonic()
            await client.run()
            if client.error is None:
                return
            kind = f"{type(client.error).__name__}: {str(client.error)[:100]}"
            failures[kind] = failures.get(kind, 0) + 1
            # When (since the burst began), after how long a stream, and with what received.
            got = sum(1 for t in typeurls.ORDER if client.view(t).responses)
            when.append((round(began - burst_start[0], 1), round(time.monotonic() - began, 1), got))
            await asyncio.sleep(0.5)

    when: list[tuple[float, float, int]] = []

    async def connect(retry: bool = False) -> dict[str, Any]:
        burst_start[0] = time.monotonic()
        for node in nodes:
            client = new_client(node)
            clients.append(client)
            tasks.append(asyncio.create_task(again(client) if retry else client.run()))
            await asyncio.sleep(0)  # a burst, as a fleet restarting its sidecars
        start = time.monotonic()
        while not all(configured(c) for c in clients):
            failed = [c for c in clients if c.error is not None]
            if failed and not retry:
                raise RuntimeError(f"{len(failed)} clients failed: {failed[0].error!r}")
            if time.monotonic() - start > 900:
                raise TimeoutError("clients did not all get their config")
            await asyncio.sleep(0.02)
        return {
            "all_configured_wall": time.time(),
            "resources": delivered[0],
            "failures": failures,
            "failure_times": sorted(when)[:: max(1, len(when) // 40)],
        }

    async def wait(targets: list[str], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            updated = [n for n in targets if route_count.get(n, 0) > marked["routes"].get(n, 0)]
            if len(updated) >= len(targets):
                return {
                    "last_wall": max(last_route[n] for n in updated),
                    "resources": delivered[0] - marked["delivered"],
                }
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(updated)} of {len(targets)} nodes updated")
            await asyncio.sleep(0.005)

    async def prober(client: AdsClient) -> None:
        while probe["on"]:
            if not probe["sent"]:
                probe["toggle"] = not probe["toggle"]
                names = [n for n in client.subscriptions.get(typeurls.ROUTE, ()) if n != PROBE_NAME]
                if probe["toggle"]:
                    names.append(PROBE_NAME)
                probe["sent"] = time.monotonic()
                client.subscribe(typeurls.ROUTE, names)
            else:
                probe["max"] = max(probe["max"], time.monotonic() - probe["sent"])
            await asyncio.sleep(0.01)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)  # "wait" lists every node id (5,000: ~100 KB)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        probe_client: AdsClient | None = None
        probe_task: asyncio.Task[None] | None = None
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                print(json.dumps({"bye": True}), flush=True)
                break
            command, _, rest = line.partition(" ")
            try:
                if command == "connect":
                    answer = await connect(retry=rest == "retry")
                elif command == "mark":
                    marked.update(
                        routes=dict(route_count), any=dict(any_count), delivered=delivered[0]
                    )
                    answer = {"marked": True}
                elif command == "wait":
                    targets_json, _, timeout = rest.rpartition(" ")
                    answer = await wait(json.loads(targets_json), float(timeout))
                elif command == "touched":
                    answer = {
                        "nodes": sum(1 for n, c in any_count.items() if c > marked["any"].get(n, 0))
                    }
                elif command == "probe" and rest == "on":
                    first = nodes[0].split("/")
                    probe_client = new_client(f"{first[0]}/{first[1]}/probe")
                    probe_client.node_id = f"{first[0]}/{first[1]}/probe"
                    tasks.append(asyncio.create_task(probe_client.run()))
                    start = time.monotonic()
                    while not configured(probe_client):
                        if time.monotonic() - start > 120:
                            raise TimeoutError("the probe got no config")
                        await asyncio.sleep(0.01)
                    probe.update(on=True, max=0.0, answers=0, sent=0.0)
                    probe_task = asyncio.create_task(prober(probe_client))
                    answer = {"probing": True}
                elif command == "probe" and rest == "off":
                    probe["on"] = False
                    if probe_task is not None:
                        await probe_task
                    answer = {"max_stall": probe["max"], "answers": probe["answers"]}
                else:
                    answer = {"error": f"unknown command {line}"}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", choices=["fleet", "worst"], default="fleet")
    parser.add_argument("--services", default="100,300", help="comma-separated sizes")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--burst-only",
        action="store_true",
        help="only the cold start: every node at once, failed streams retried and counted",
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("WORK", "PORT", "IDENTITY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker_main(Path(args.worker[0]), int(args.worker[1]), args.worker[2])
        return
    sizes = [int(s) for s in args.services.split(",")]
    if args.burst_only:
        for n in sizes:
            print(json.dumps({"services": n, "replicas": args.replicas,
                              **run_burst(args.topology, n, args.replicas)}), flush=True)  # fmt: skip
        return
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:  # interleaved: every size once per round
            results[n].append(run_size(args.topology, n, args.replicas))
    print(f"xDS at fleet scale ({args.topology}; replicas {args.replicas}; {args.rounds} round(s); "
          "SotW; simulated nodes decode before ACK and follow EDS/RDS)")  # fmt: skip
    print(f"{'services':>8} {'nodes':>6} {'cold s':>7} {'1-edit ms':>9} {'mesh s':>7} "
          f"{'CPU/change s':>12} {'us/resource':>11} {'+KiB/node':>9} {'stall ms':>8} {'/status s':>9} {'nodes s':>7} {'/metrics s':>10}")  # fmt: skip
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))} for n, rs in results.items()}  # fmt: skip
    for n in sizes:
        m = med[n]
        per_resource = m["mesh_cpu"] * 1e6 / max(1, m["mesh_resources"])
        print(f"{m['services']:8.0f} {m['nodes']:6.0f} {m['cold']:7.1f} {m['one'] * 1000:9.0f} {m['mesh']:7.2f} "
              f"{m['mesh_cpu']:12.2f} {per_resource:11.1f} {(m['rss'] - m['rss0']) * 1024 / m['nodes']:9.0f} "
              f"{m['stall'] * 1000:8.0f} {m['status']:9.2f} {m['status_nodes']:7.2f} {m['metrics']:10.2f}")  # fmt: skip
        print(f"{'':8} one-policy edit: {m['one_nodes']:.0f} affected nodes, {m['one_touched']:.0f} "
              f"nodes got anything, server CPU {m['one_cpu'] * 1000:.0f} ms; cold start server CPU "
              f"{m['cold_cpu']:.1f} s, RSS {m['rss0']:.0f} MiB compiled, {m['rss']:.0f} MiB with every node "
              f"connected ({m['rss'] / m['services']:.2f} MiB per service); "
              f"probe answers {m['probes']:.0f}")  # fmt: skip
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        print(f"growth {a} -> {b} services ({b / a:.1f}x): cold start {med[b]['cold'] / med[a]['cold']:.1f}x, "
              f"one-policy edit {med[b]['one'] / med[a]['one']:.1f}x, "
              f"mesh-wide edit {med[b]['mesh'] / med[a]['mesh']:.1f}x, server CPU per mesh-wide change "
              f"{med[b]['mesh_cpu'] / max(1e-9, med[a]['mesh_cpu']):.1f}x, cold start CPU "
              f"{med[b]['cold_cpu'] / max(1e-9, med[a]['cold_cpu']):.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
