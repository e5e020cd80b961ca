"""How fast a policy change reaches every sidecar, and what each connected node costs the server.

Side by side in one run, against the real `meshward xds serve` process (mTLS, policy watcher):

1. 10 real sidecars (one per workload, each a `meshward agent` running its Envoy, the control
   plane with --secrets agent): time from writing a policy file to the control plane seeing
   every Envoy ACK the new config (a rule edit is a route config, pushed over RDS).
2. N simulated ADS clients (default 1,000: 10 workloads x 100 replicas), grpc streams over mTLS
   in a separate process, following the route configs their listeners name as Envoy does: the
   same change, timed to the last client's ACK of a listener or route; the server's RSS
   as nodes connect (per-node cost and whether it grows linearly); and a change to one
   workload, checking that only that workload's nodes were pushed anything.

    python bench/xds_convergence.py [--nodes 1000] [--rounds 3] [--delta]

Convergence is measured from the file write, so it includes the policy watcher's detection
(poll interval 50 ms, a change must hold still for one poll); "after apply" subtracts the
moment the server applied the new version (from its /status).
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

from meshward.testing.bench_server import process_cpu, rss_mb
from meshward.testing.processes import Launcher

WORKLOADS = [f"svc{i:02d}" for i in range(10)]
NAMESPACE = "bench"
WATCH_INTERVAL = 0.05


# -- policy -----------------------------------------------------------------------------------------
def policy_text(round_: int, one_workload_methods: str = '"GET"') -> str:
    docs = [
        "apiVersion: meshward.dev/v1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
        "spec: {trustDomain: cluster.local}\n",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: strict, namespace: meshward-system}\nspec: {mtls: {mode: STRICT}}\n",
        # The mesh-wide rule every change edits: every workload's inbound RBAC changes.
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-admin, namespace: meshward-system}\n"
        f'spec: {{action: DENY, rules: [{{to: [{{operation: {{paths: ["/admin-{round_}"]}}}}]}}]}}\n',
    ]
    for name in WORKLOADS:
        methods = one_workload_methods if name == "svc03" else '"GET"'
        docs.append(
            f"apiVersion: meshward.dev/v1\nkind: Workload\n"
            f"metadata: {{name: {name}, namespace: {NAMESPACE}, labels: {{app: {name}}}}}\n"
            "spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}\n"
        )
        docs.append(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}-allow, namespace: {NAMESPACE}}}\n"
            f"spec:\n  selector: {{matchLabels: {{app: {name}}}}}\n"
            f"  rules: [{{from: [{{source: {{namespaces: [{NAMESPACE}]}}}}], "
            f"to: [{{operation: {{methods: [{methods}]}}}}]}}]\n"
        )
    return "---\n".join(docs)


def write_policy(directory: Path, text: str) -> None:
    tmp = directory / ".mesh.yaml.tmp"
    tmp.write_text(text)
    tmp.replace(directory / "mesh.yaml")


# -- the server process ----------------------------------------------------------------------------
class Server:
    def __init__(self, work: Path, name: str, bindings: Path, extra: tuple[str, ...] = ()) -> None:
        self.work = work
        self.ready = work / f"{name}.ready.json"
        argv = [
            sys.executable, "-m", "meshward", "xds", "serve",
            "--policy", str(work / "policies"), "--ca", str(work / "ca"),
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
            "--bindings", str(bindings), "--access-log", "off",
            "--watch-interval", str(WATCH_INTERVAL), "--ready-file", str(self.ready),
            "--listen-host", "127.0.0.1", *extra,
        ]  # fmt: skip
        self.launcher = Launcher(work, quiet=True)
        info = self.launcher.start(name, argv, ready_path=self.ready, timeout=60)
        pid = self.launcher[name].pid
        assert pid is not None
        self.pid = pid
        self.log = self.launcher[name].log_path
        self.ads_port = int(info["ads"].rsplit(":", 1)[1])
        self.admin = info["admin"]
        self.identity = info["server_identity"]
        self.join = info.get("join")

    def status(self) -> dict[str, Any]:
        """The per-node view, every page (as `meshward status` reads it)."""
        from meshward.xds.status_cli import fetch_nodes

        return fetch_nodes(self.admin, 30, ())

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def cpu_seconds(self) -> float:
        return process_cpu(self.pid)

    def stop(self) -> None:
        self.launcher.stop_all()


def all_synced(status: dict[str, Any], version: str, nodes: int) -> bool:
    if status["policy"]["version"] != version:
        return False
    connected = [n for n in status["nodes"] if n["connected"]]
    return len(connected) >= nodes and all(
        t["in_sync"] for n in connected for s in n["streams"] for t in s["types"]
    )


def applied_at(status: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(status["policy"]["applied_at"]).timestamp()


def new_version(text: str) -> str:
    from meshward.policy import parse

    return parse({"mesh.yaml": text}).version


# -- scenario 1: real Envoys -----------------------------------------------------------------------
def real_envoys(work: Path, bindings: Path, rounds: int, delta: bool) -> dict[str, Any]:
    """Every sidecar as in production: a `meshward agent` (join token, key on the node, SDS)
    running its Envoy, started through the test launcher; the control plane with
    --secrets agent."""
    import shutil

    from meshward.certs import CertificateAuthority
    from meshward.testing.mesh import agent_argv, agent_serving, write_join_token

    server = Server(
        work, "envoys", bindings, ("--secrets", "agent", "--join-listen", "127.0.0.1:0")
    )
    agents = Launcher(work, quiet=True, logs=work / "agent-logs")
    state_root = Path(tempfile.mkdtemp(prefix="mwc-"))  # short: Unix socket paths
    try:
        roots = work / "root.pem"
        roots.write_bytes(CertificateAuthority.load(work / "ca").trust_bundle().roots_pem)
        for name in WORKLOADS:
            ref = f"{NAMESPACE}/{name}"
            argv = agent_argv(
                ref, f"127.0.0.1:{server.ads_port}", state_root / name,
                join=server.join, root_cert=roots, delta=delta, envoy_args=("--drain-time-s", "2"),
                token_file=write_join_token(work / "ca", ref, work / f"{name}.token"),
            )  # fmt: skip
            agents.launch(name, argv, ready=agent_serving(state_root / name), timeout=60)
        agents.wait_ready()
        current = new_version((work / "policies" / "mesh.yaml").read_text())
        count = len(WORKLOADS)
        wait_until(lambda: all_synced(server.status(), current, count), 60, "initial sync")
        times, after_apply = [], []
        for round_ in range(1, rounds + 1):
            text = policy_text(1000 + round_)
            version = new_version(text)
            start = time.time()
            write_policy(work / "policies", text)
            wait_until(lambda v=version: all_synced(server.status(), v, count), 30, "sync")
            end = time.time()
            times.append(end - start)
            after_apply.append(end - applied_at(server.status()))
        return {"convergence": times, "after_apply": after_apply, "rss_mb": server.rss_mb()}
    finally:
        agents.stop_all()
        server.stop()
        shutil.rmtree(state_root, ignore_errors=True)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)


# -- scenario 2: simulated clients (worker process) ------------------------------------------------
class Worker:
    """The client process (on the server's launcher, log ``logs/worker.log``), driven over
    stdin/stdout JSON lines."""

    def __init__(self, work: Path, server: Server, delta: bool) -> None:
        argv = [sys.executable, __file__, "--worker", str(work), str(server.ads_port),
                server.identity] + (["--delta"] if delta else [])  # fmt: skip
        self.worker = server.launcher.launch("worker", argv, pipe_stdin=True, pipe_stdout=True)

    def ask(self, command: str) -> dict[str, Any]:
        self.worker.write(command + "\n")
        line = self.worker.readline()
        if not line:
            raise RuntimeError(
                f"worker died on {command!r}; last log lines:\n{self.worker.log()[-2000:]}"
            )
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"worker: {answer['error']}")
        return answer

    def stop(self) -> None:
        """End its input (it quits at EOF), 10 s to exit, then it is stopped."""
        self.worker.close_input(timeout=10)


def simulated(work: Path, bindings: Path, nodes: int, rounds: int, delta: bool) -> dict[str, Any]:
    server = Server(work, "simulated", bindings)
    worker = Worker(work, server, delta)
    try:
        rss = [(0, server.rss_mb())]
        connect_times = []
        steps = sorted({nodes // 4, nodes // 2, 3 * nodes // 4, nodes} - {0})
        for count in steps:
            answer = worker.ask(f"connect {count}")
            connect_times.append(answer["seconds"])
            time.sleep(0.5)
            rss.append((count, server.rss_mb()))
        times, after_apply, cpu, status_seconds = [], [], [], []
        for round_ in range(1, rounds + 1):
            worker.ask("mark")
            cpu_before = server.cpu_seconds()
            start = time.time()
            write_policy(work / "policies", policy_text(2000 + round_))
            answer = worker.ask(f"wait {nodes} 60")
            cpu.append(server.cpu_seconds() - cpu_before)
            times.append(answer["last_wall"] - start)
            started = time.perf_counter()
            after_apply.append(answer["last_wall"] - applied_at(server.status()))
            status_seconds.append(time.perf_counter() - started)
        version = new_version(policy_text(2000 + rounds))
        try:
            wait_until(lambda: all_synced(server.status(), version, nodes), 15, "server sync", 0.2)
            synced = True
        except TimeoutError:
            synced = False
            status = server.status()
            behind = [
                (n["node"], t["type"], t["desired"], t["acked"])
                for n in status["nodes"] for s in n["streams"] for t in s["types"] if not t["in_sync"]
            ]  # fmt: skip
            print(f"  server: {len(behind)} types not in sync, e.g. {behind[:3]}", file=sys.stderr)
        # A change to one workload: only its nodes may get anything.
        worker.ask("mark")
        write_policy(work / "policies", policy_text(2000 + rounds, '"GET", "POST"'))
        per_workload = nodes // len(WORKLOADS)
        answer = worker.ask(f"wait {per_workload} 30")
        time.sleep(1.0)  # anything else pushed would have arrived by now
        touched = worker.ask("touched")["by_workload"]
        return {
            "connect_seconds": connect_times,
            "rss": rss,
            "convergence": times,
            "after_apply": after_apply,
            "server_cpu": cpu,
            "status_seconds": status_seconds,
            "server_synced": synced,
            "one_change_seconds": answer["last_wall"] - answer["mark_wall"],
            "touched": touched,
        }
    finally:
        worker.stop()
        server.stop()


def worker_main(work: Path, port: int, identity: str, delta: bool) -> None:
    from meshward.certs.client_tls import client_ssl_context
    from meshward.testing.ads_client import AdsClient
    from meshward.xds import typeurls

    creds = work / "creds"
    roots = (creds / "ca.pem").read_bytes()
    contexts = {
        name: client_ssl_context(
            (creds / name / "cert.pem").read_bytes(), (creds / name / "key.pem").read_bytes(), roots
        )
        for name in WORKLOADS
    }
    clients: list[AdsClient] = []
    tasks: list[asyncio.Task[None]] = []
    lds_count: dict[str, int] = {}
    last_lds: dict[str, float] = {}
    any_count: dict[str, int] = {}
    marked: dict[str, Any] = {"lds": {}, "any": {}, "wall": 0.0}

    def on_response(client: AdsClient, type_url: str, response: Any) -> None:
        node = client.node_id
        any_count[node] = any_count.get(node, 0) + 1
        # A rule edit arrives as a route config (RDS); a new kind of filter also as a listener.
        if type_url in (typeurls.LISTENER, typeurls.ROUTE):
            lds_count[node] = lds_count.get(node, 0) + 1
            last_lds[node] = time.time()

    async def connect(total: int) -> dict[str, Any]:
        start = time.monotonic()
        for index in range(len(clients), total):
            name = WORKLOADS[index % len(WORKLOADS)]
            client = AdsClient(
                "127.0.0.1", port, f"{NAMESPACE}/{name}/r{index // len(WORKLOADS)}",
                contexts[name], server_identity=identity, delta=delta,
                # as a real node: its SVID is its own (agent), nothing of it over ADS
                subscriptions={typeurls.CLUSTER: (), typeurls.LISTENER: ()},
                on_response=on_response, follow_routes=True,
            )  # fmt: skip
            clients.append(client)
            tasks.append(asyncio.create_task(client.run()))

        def configured(c: AdsClient) -> bool:  # listeners, and the routes they name
            return bool(c.view(typeurls.LISTENER).responses and c.view(typeurls.ROUTE).responses)

        while sum(1 for c in clients if configured(c)) < total:
            failed = [c for c in clients if c.error is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} clients failed: {failed[0].error!r}")
            if time.monotonic() - start > 120:
                raise TimeoutError("clients did not all get their config")
            await asyncio.sleep(0.02)
        return {"connected": total, "seconds": time.monotonic() - start}

    async def wait(count: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            updated = [n for n, c in lds_count.items() if c > marked["lds"].get(n, 0)]
            if len(updated) >= count:
                return {"nodes": len(updated), "last_wall": max(last_lds[n] for n in updated),
                        "mark_wall": marked["wall"]}  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(updated)} of {count} nodes updated")
            await asyncio.sleep(0.002)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                print(json.dumps({"bye": True}), flush=True)
                break
            command, *args = line.split()
            try:
                if command == "connect":
                    answer = await connect(int(args[0]))
                elif command == "mark":
                    marked.update(lds=dict(lds_count), any=dict(any_count), wall=time.time())
                    answer = {"marked": True}
                elif command == "wait":
                    answer = await wait(int(args[0]), float(args[1]))
                elif command == "touched":
                    by_workload: dict[str, int] = {}
                    for node, count in any_count.items():
                        if count > marked["any"].get(node, 0):
                            workload = node.split("/")[1]
                            by_workload[workload] = by_workload.get(workload, 0) + 1
                    answer = {"by_workload": by_workload}
                else:
                    answer = {"error": f"unknown command {command}"}
            except Exception as exc:
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(answer), flush=True)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(serve())


# -- setup and report -----------------------------------------------------------------------------
def prepare(work: Path) -> Path:
    from meshward.certs import CertificateAuthority
    from meshward.compile import runtime_bindings
    from meshward.net import free_port
    from meshward.policy import parse
    from meshward.xds.cli import dump_bindings

    ca = CertificateAuthority.init(work / "ca", "cluster.local")
    creds = work / "creds"
    from meshward.testing.sidecar import node_svid

    for name in WORKLOADS:  # each simulated node's key made "on the node", its CSR signed
        svid = node_svid(ca, f"spiffe://cluster.local/ns/{NAMESPACE}/sa/{name}")
        (creds / name).mkdir(parents=True)
        (creds / name / "cert.pem").write_bytes(svid.cert_chain_pem)
        (creds / name / "key.pem").write_bytes(svid.private_key_pem)
    (creds / "ca.pem").write_bytes(ca.trust_bundle().roots_pem)
    (work / "policies").mkdir()
    text = policy_text(0)
    write_policy(work / "policies", text)
    policy = parse({"mesh.yaml": text})
    bindings = runtime_bindings(policy.workloads, (free_port() for _ in iter(int, 1)))
    path = work / "bindings.json"
    path.write_text(json.dumps(dump_bindings(bindings)))
    return path


def fmt(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.0f} ms  (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delta", action="store_true", help="delta ADS instead of SotW")
    parser.add_argument("--skip-envoy", action="store_true", help="only the simulated clients")
    parser.add_argument(
        "--worker", nargs=3, metavar=("WORK", "PORT", "IDENTITY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        worker_main(Path(args.worker[0]), int(args.worker[1]), args.worker[2], args.delta)
        return
    mode = "delta" if args.delta else "SotW"
    with tempfile.TemporaryDirectory(prefix="meshward-bench-xds-") as tmp:
        work = Path(tmp)
        bindings = prepare(work)
        print(f"xDS convergence ({mode}; {len(WORKLOADS)} workloads; {args.rounds} rounds; mTLS)")
        envoy = None
        if not args.skip_envoy:
            envoy = real_envoys(work, bindings, args.rounds, args.delta)
            print(f"  10 real Envoys      change -> all ACKed: {fmt(envoy['convergence'])}")
            print(f"                      after server apply:  {fmt(envoy['after_apply'])}")
        sim = simulated(work, bindings, args.nodes, args.rounds, args.delta)
        print(f"  {args.nodes} simulated  change -> all ACKed: {fmt(sim['convergence'])}"
              f"   target < 2000 ms: {'met' if statistics.median(sim['convergence']) < 2 else 'MISSED'}")  # fmt: skip
        print(f"                      after server apply:  {fmt(sim['after_apply'])}")
        print(f"                      server CPU per change: {statistics.median(sim['server_cpu']) * 1000:.0f} ms"
              f"  ({statistics.median(sim['server_cpu']) * 1e6 / args.nodes:.0f} us per node)")  # fmt: skip
        print(f"                      server agrees all in sync: {sim['server_synced']}; "
              f"GET /status for {args.nodes} nodes: {statistics.median(sim['status_seconds']) * 1000:.0f} ms")  # fmt: skip
        if envoy:
            ratio = statistics.median(sim["convergence"]) / statistics.median(envoy["convergence"])
            print(
                f"  ratio {args.nodes} simulated / 10 Envoys: {ratio:.1f}x for {args.nodes // 10}x the nodes"
            )
        print("  server RSS as nodes connect:")
        base = sim["rss"][0][1]
        for count, rss in sim["rss"]:
            per = f"{(rss - base) * 1024 / count:6.1f} KiB/node" if count else ""
            print(f"    {count:5d} nodes  {rss:7.1f} MiB  {per}")
        (n1, r1), (n2, r2) = sim["rss"][len(sim["rss"]) // 2], sim["rss"][-1]
        first = (r1 - base) / n1 if n1 else 0
        second = (r2 - r1) / (n2 - n1) if n2 > n1 else 0
        print(f"    marginal cost, second half / first half: {second / first if first else float('nan'):.2f}"
              "  (1.0 = linear; < 1 sublinear)")  # fmt: skip
        touched = sim["touched"]
        only = set(touched) == {"svc03"}
        print(f"  change to one workload (svc03): nodes pushed to by workload {touched}"
              f" -> {'only svc03' if only else 'OTHERS TOO'}; converged in {sim['one_change_seconds'] * 1000:.0f} ms")  # fmt: skip
        print(
            f"  connect times (s) per step: {', '.join(f'{t:.1f}' for t in sim['connect_seconds'])}"
        )


if __name__ == "__main__":
    main()
