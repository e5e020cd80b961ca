"""The control plane at fleet scale: realistic topologies, every node a distinct-enough sidecar.

Against the real `meshward xds serve` process in the product's mode (`--secrets agent`: it never
makes or sends a workload key; every sidecar runs under `meshward agent`, which gets its SVID
by CSR and serves SDS itself), every process started through the test launcher
(meshward.testing.processes.Launcher):

- simulated nodes (bench/fleet_nodes.py, shared out over ``--node-processes`` processes, 2 by
  default, so the simulation's Python is not held to one core) behave as an agent-run Envoy
  on the wire: their ADS stream with the SVID their agent holds (pre-issued per service, the
  replicas sharing it), CDS and LDS as wildcards, then the EDS and RDS names the clusters and
  listeners reference, no SDS from the control plane; every response decoded before its ACK;
  delta ADS as `meshward agent` speaks by default, or SotW (``--ads sotw``; ``--ads both``
  runs each size both ways, interleaved, and prints delta's figures as ratios of SotW's);
- ``--envoys`` (default 10) real Envoys alongside, each run by a `meshward agent` (one-time
  join token, key made on the node, SVID by CSR), serving services of the same topology (the
  first is the one-policy edit's callee).

Topologies (meshward.testing.topology):

- fleet: N distinct services x R replicas in namespaces of 30; each service callable by ~10
  others named by principal, plus namespace-wide rules (monitoring ALLOW, same-namespace GETs,
  DENY /admin from outside);
- worst: one namespace of N services and one namespace-wide ALLOW (every sidecar gets every
  peer: bytes delivered grow with N^2 whatever compile does).

Sizes are interleaved (round 1 of every size, then round 2, ...). Per size it prints: cold
start (a control-plane (re)start: from launching the server, compile included, to every
simulated node configured; the nodes already hold their SVIDs and connect in one burst as soon
as it listens), a one-policy edit converged at the affected nodes, a mesh-wide edit (a
root-namespace DENY) converged at every node, both timed from the policy-file write to the
control plane's last recorded ACK of the change (``acked_at`` in /status?view=nodes, the same
endpoint and criterion for simulated nodes and real Envoys, reported apart; the edited files are
rendered before the clock starts), the one-policy edit's timeline as the control plane recorded
it (``policy.last_change`` in /status), server CPU per
change and per delivered resource, server RSS per node and per service, and the longest stall
of a probe stream during the mesh-wide recompile (the probe, in a process of its own, changes
its RDS subscription every 10 ms and times each answer).

    python bench/xds_fleet.py [--topology fleet] [--services 100,300] [--replicas 2] [--envoys 10]

``--nodes-impl node`` runs the same simulated nodes in Node.js (bench/fleet_js/fleet_nodes.js:
the same nodes, subscriptions and decoding on the wire, ~0.6x the CPU of Python's `ssl` and
grpclib at 1,000 x 5: bench/README.md, session 9); its name is in every output.

``/status s`` times the default summary, ``nodes s`` every node's document (``?view=nodes``, page
by page, as `meshward status` reads it). ``--burst-only``: only the cold start, every node at
once, failed streams retried after 500 ms like Envoy and counted by error, then the same nodes
against bench/fleet_floor.py's server, which answers with pre-encoded responses and costs nothing
but gRPC (the floor under any cold start on this machine; ``$MESHWARD_BENCH_NO_FLOOR`` skips
it); one JSON line per size and round. ``$MESHWARD_BENCH_SERVER_TREE=DIR`` runs the server from
another ``meshward`` tree (meshward.testing.bench_server), for an A/B of the server alone.
The server runs with per-identity limits raised: simulated replicas share their service's
certificate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet_report import compare_modes, median_of, report
from bench.fleet_workers import NodeFleet, Worker
from meshward.testing.bench_server import BenchServer
from meshward.testing.processes import Launcher
from meshward.xds.timeline import STAGES as TIMELINE


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
    return write_files(directory, changed_files(directory, policy_files(ps)))


def changed_files(directory: Path, files: Mapping[str, str]) -> dict[str, str]:
    """The files whose text differs from what ``directory`` holds: rendered and compared
    before an edit's clock starts (rendering a 1,000-service set takes seconds of the
    benchmark's own CPU, which is no part of the control plane's convergence)."""
    return {
        name: text
        for name, text in files.items()
        if not (directory / name).exists() or (directory / name).read_text() != text
    }


def write_files(directory: Path, files: Mapping[str, str]) -> int:
    """Write each file atomically (a temp file, then rename); returns how many."""
    for name, text in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(directory / name)
    return len(files)


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


# -- the processes (all through meshward.testing.processes.Launcher) ---------------------------
class Server(BenchServer):
    """`meshward xds serve` as in production with node agents (it never makes or sends a
    workload key; SVIDs come by CSR), a join listener for the real Envoys' agents."""

    def __init__(
        self, work: Path, launcher: Launcher, ads_port: int = 0, wait: bool = True
    ) -> None:
        """``ads_port``: fixed, so simulated nodes can connect as soon as it listens (with the
        first compile still running: their streams wait for it), before the ready file;
        ``wait=False``: :meth:`finish` later."""
        super().__init__(
            launcher, work, name="xds", ads_port=ads_port, wait=wait,
            extra=("--join-listen", "127.0.0.1:0", "--flows-db", "off",
                   "--svid-rate", "100000", "--svid-burst", "100000"),
        )  # fmt: skip

    def status_seconds(self) -> tuple[float, float, float]:
        """(GET /status: the summary; every node's document, /status?view=nodes page by page,
        as `meshward status` reads it; a /metrics scrape)."""
        start = time.perf_counter()
        with urllib.request.urlopen(self.admin + "/status", timeout=120) as response:
            response.read()
        summary = time.perf_counter() - start
        start = time.perf_counter()
        self.nodes()
        nodes = time.perf_counter() - start
        start = time.perf_counter()
        with urllib.request.urlopen(self.admin + "/metrics", timeout=120) as response:
            response.read()
        return summary, nodes, time.perf_counter() - start

    def nodes(self, names: Sequence[str] = ()) -> list[dict[str, Any]]:
        from meshward.xds.status_cli import fetch_nodes

        found: list[dict[str, Any]] = fetch_nodes(self.admin, 120, names)["nodes"]
        return found


@dataclasses.dataclass
class Target:
    """Where the simulated nodes connect before the server's ready file says so."""

    ads_port: int
    identity: str


def target(ps: Any) -> Target:
    """A free port for the server's ADS (chosen here, so the nodes can start first) and the
    identity it will present."""
    from meshward.xds.controlplane import server_spiffe_id

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return Target(port, server_spiffe_id(ps, ps.mesh.trust_domain))


def envoy_refs(ps: Any, callee: str, count: int) -> list[str]:
    """The services the real Envoys serve: the one-policy edit's callee (so one real Envoy is
    among its affected nodes) and others spread over the fleet."""
    refs = sorted(w.ref for w in ps.workloads)
    if count <= 0:
        return []
    first = callee if callee in refs else refs[0]
    others = [r for r in refs if r != first]
    step = max(1, len(others) // max(1, count - 1))
    return [first, *others[::step][: count - 1]]


def start_envoys(
    work: Path, launcher: Launcher, server: Server, ps: Any, refs: list[str], state_root: Path,
    ads: str,
) -> list[str]:  # fmt: skip
    """A real Envoy per ref, each run by its `meshward agent` (one-time join token, key made on
    the node, SVID by CSR, SDS on a Unix socket), node id REF/envoy; returns the node ids.
    The compiled listeners bind fixed ports (no per-workload bindings, or the fleet's shared
    outbound listeners would be per caller): Envoy binds them with SO_REUSEPORT, so ten Envoys
    on one machine do not refuse each other's listeners."""
    from meshward.certs import CertificateAuthority
    from meshward.testing.mesh import agent_argv, agent_serving, write_join_token

    roots = work / "root.pem"
    roots.write_bytes(CertificateAuthority.load(work / "ca").trust_bundle().roots_pem)
    names = []
    for i, ref in enumerate(refs):
        state = state_root / f"e{i}"
        argv = agent_argv(
            ref, f"127.0.0.1:{server.ads_port}", state,
            trust_domain=ps.mesh.trust_domain, root_namespace=ps.mesh.root_namespace,
            join=server.join, root_cert=roots,
            token_file=write_join_token(work / "ca", ref, work / f"e{i}.token"),
            envoy_args=("--drain-time-s", "2"),
            delta=ads == "delta",
            extra=("--instance", "envoy"),
        )  # fmt: skip
        launcher.launch(f"agent-{i}", argv, ready=agent_serving(state), timeout=180)
        names.append(f"agent-{i}")
    launcher.wait_ready(names)
    return [f"{ref}/envoy" for ref in refs]


# -- timing from the control plane's view --------------------------------------------------------
def _wall(iso: str | None) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


def node_acks(document: Mapping[str, Any]) -> tuple[bool, float]:
    """(every type in sync and the policy enforced, the node's latest ACK as Unix time)."""
    types = [t for s in document.get("streams", []) for t in s.get("types", [])]
    ok = bool(types) and all(t["in_sync"] for t in types) and bool(document["policy_enforced"])
    return ok, max((_wall(t.get("acked_at")) for t in types), default=0.0)


def converged_at(
    server: Server, groups: Sequence[Sequence[str]], since: float, timeout: float = 60.0
) -> list[float]:
    """For each group of node names: when the control plane recorded the last of its ACKs of
    the change made at ``since`` (every node in sync, each with an ACK after ``since``). A
    simulated node reports the change when it has decoded it, a moment before the control plane
    has read its ACK, so this polls until the ACKs are recorded; the times are the recorded
    ACK times, not when the poll saw them. Raises with the node's document after ``timeout``.

    The per-node pages are read only once the /status summary counts every connected node in
    sync: reading all of them costs the server's loop 1-1.8 s at 5,000 nodes, and done while
    the last ACKs were still arriving it delayed the very ACK times measured (by up to 2.7 s
    over the nodes' own last-route time, h14mesh)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet = server.status()["fleet"]
        if fleet["in_sync"] >= fleet["connected"]:
            break
        time.sleep(0.05)
    while True:
        by_name = {d["node"]: d for d in server.nodes()}
        lagging = None
        out: list[float] = []
        for names in groups:
            last = since
            for name in names:
                document = by_name.get(name)
                if document is None:
                    raise RuntimeError(f"{name}: not in the control plane's status")
                ok, acked = node_acks(document)
                if not ok or acked < since:
                    lagging = document
                    break
                last = max(last, acked)
            out.append(last - since if names else math.nan)
            if lagging is not None:
                break
        if lagging is None:
            return out
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{lagging['node']}: not in sync with the change after {timeout:.0f} s: "
                f"{json.dumps(lagging, default=str)[:3000]}"
            )
        time.sleep(0.5)


def edit_timeline(server: Server, since: float) -> dict[str, float]:
    """Seconds from the policy-file write at ``since`` to each stage of the change as the
    control plane recorded it (``policy.last_change`` in /status; NaN for a stage it did not
    record, e.g. a control plane from before the timeline)."""
    with urllib.request.urlopen(server.admin + "/status", timeout=120) as response:
        change = json.loads(response.read())["policy"].get("last_change") or {}
    return {
        stage: _wall(change[f"{stage}_at"]) - since if f"{stage}_at" in change else math.nan
        for stage in TIMELINE
    }


def stall_phases(
    waits: list[tuple[float, float]], since: float, timeline: Mapping[str, float]
) -> dict[str, float]:
    """The probe's longest wait in each phase of the mesh-wide edit: while the control plane
    compiled (``stall_compile``: from compile_started to compiled, the result back on the loop)
    and while it pushed and read the ACKs (``stall_fanout``: after compiled). A wait that spans
    both counts its part in each; NaN when the timeline lacks the stage."""
    begin, end = since + timeline["compile_started"], since + timeline["compiled"]
    if math.isnan(begin) or math.isnan(end):
        return {"stall_compile": math.nan, "stall_fanout": math.nan}
    compiling = fanning = 0.0
    for sent, waited in waits:
        answered = sent + waited
        compiling = max(compiling, min(answered, end) - max(sent, begin))
        fanning = max(fanning, answered - max(sent, end))
    return {"stall_compile": compiling, "stall_fanout": fanning}


def wait_envoys(server: Server, names: list[str], since: float, timeout: float) -> None:
    """Until every named node (the real Envoys) ACKed something after ``since`` and is in sync;
    polls the filtered per-node view (the times come from its ACK records, not this loop)."""
    deadline = time.monotonic() + timeout
    while names:
        documents = server.nodes(names)
        states = [node_acks(d) for d in documents]
        if len(states) == len(names) and all(ok and at >= since for ok, at in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"real Envoys not in sync after {timeout:.0f}s: {documents}")
        time.sleep(0.1)


def prepare(work: Path, ps: Any, replicas: int) -> list[str]:
    """CA, the policy files, and each service's SVID as its nodes' agents would hold it (one per
    service, its replicas sharing it): the nodes connect with SVIDs they already have, as after
    a control-plane restart. Returns the simulated node ids."""
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


def run_size(
    topology: str, services: int, replicas: int, envoys: int, ads: str = "sotw",
    processes: int = 2, impl: str = "python",
) -> dict[str, Any]:  # fmt: skip
    ps = policy_set(topology, services)
    edited, callee = one_policy_edit(ps)
    with (
        tempfile.TemporaryDirectory(prefix="meshward-bench-fleet-") as tmp,
        tempfile.TemporaryDirectory(prefix="mwf-") as agents,  # short: Unix socket paths
    ):
        work = Path(tmp)
        nodes = prepare(work, ps, replicas)
        with Launcher(work, quiet=True) as launcher:
            where = target(ps)
            # The nodes' process first: a restarted control plane's fleet is there already.
            worker = NodeFleet(work, launcher, where, ads, processes, impl=impl)
            t0 = time.time()
            server = Server(work, launcher, where.ads_port, wait=False)
            try:
                return {"ads": ads, "nodes_impl": impl, **measure(work, launcher, server, worker, ps, nodes, edited,
                                              callee, t0, envoys, Path(agents))}  # fmt: skip
            finally:
                worker.stop()


def measure(
    work: Path, launcher: Launcher, server: Server, worker: NodeFleet, ps: Any,
    nodes: list[str], edited: Any, callee: str, t0: float, envoys: int, agents: Path,
) -> dict[str, Any]:  # fmt: skip
    nodes_cpu0, connect_at = worker.cpu_seconds(), time.time()
    worker.send("connect listening")  # from the moment the port listens
    server.finish()
    rss0 = server.rss_mb()  # compiled; the streams opened so far held, nothing served yet
    connected = worker.answer("connect")
    cold = connected["all_configured_wall"] - t0
    cpu_cold = server.cpu_seconds()
    nodes_cpu = worker.cpu_seconds() - nodes_cpu0
    # The probe in a process of its own: its answers are timed without waiting behind the
    # simulated nodes' decoding (in the nodes' process, that delay was part of it).
    # It speaks the nodes' ADS variant: each of its subscription changes gets an answer to
    # time (delta answers a name that does not exist in removed_resources). Until session 8
    # it was SotW whatever the nodes spoke, so in a delta fleet each answer it timed carried
    # its node's every route (the first node is the monitoring workload's: 1,001 routes).
    prober = Worker(work, launcher, "probe", server, worker.ads, impl=worker.impl)
    try:
        return measure_edits(work, launcher, server, worker, prober, ps, nodes, edited, callee,
                             envoys, agents, {
            "cold": cold,
            "cold_cpu": cpu_cold,
            **cold_phases(t0, server, connect_at, connected, cpu_cold, nodes_cpu),
            "resources_cold": connected["resources"],
            "rss0": rss0,
        })  # fmt: skip
    finally:
        prober.stop()


def measure_edits(
    work: Path, launcher: Launcher, server: Server, worker: NodeFleet, prober: Worker, ps: Any,
    nodes: list[str], edited: Any, callee: str, envoys: int, agents: Path, cold: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    rss, rss_worker = server.rss_mb(), server.compiler_rss_mb()
    real = start_envoys(
        work, launcher, server, ps, envoy_refs(ps, callee, envoys), agents, worker.ads
    )
    wait_envoys(server, real, 0.0, 180)

    def hit(name: str) -> bool:
        return callee == "*" or name.startswith(callee + "/")

    affected, real_affected = [n for n in nodes if hit(n)], [n for n in real if hit(n)]
    # One policy: the affected nodes are the callee's replicas (and its real Envoy).
    worker.ask("mark")
    files = changed_files(work / "policies", policy_files(edited))  # before the clock starts
    cpu0, start = server.cpu_seconds(), time.time()
    write_files(work / "policies", files)
    one = worker.ask(f"wait {json.dumps(affected)} 120")
    time.sleep(1.0)  # anything else pushed would have arrived by now
    touched = worker.ask("touched")["nodes"]
    one_cpu = server.cpu_seconds() - cpu0
    wait_envoys(server, real_affected, start, 120)
    one_sim, one_real = converged_at(server, [affected, real_affected], start)
    timeline = edit_timeline(server, start)
    # Mesh-wide: a root-namespace DENY changes every node's inbound route.
    worker.ask("mark")
    prober.ask("probe on")
    files = changed_files(work / "policies", policy_files(mesh_wide_edit(edited)))
    cpu0, start2, nodes0 = server.cpu_seconds(), time.time(), worker.cpu_seconds()
    write_files(work / "policies", files)
    mesh = worker.ask(f"wait {json.dumps(nodes)} 600")
    mesh_cpu = server.cpu_seconds() - cpu0
    # The simulated nodes' processes: if they were busy for about the whole edit, they
    # (decoding, ACKing), not the server, set the pace.
    nodes_cpu = worker.cpu_seconds() - nodes0
    probe = prober.ask("probe off")
    wait_envoys(server, real, start2, 120)
    mesh_sim, mesh_real = converged_at(server, [nodes, real], start2)
    mesh_timeline = edit_timeline(server, start2)
    status, status_nodes, metrics = server.status_seconds()
    return {
        "nodes": len(nodes),
        "services": len(ps.workloads),
        "envoys": len(real),
        **cold,
        "rss": rss,
        # the compile worker's, its largest: after the cold start or after the edits
        "rss_worker": max(rss_worker, server.compiler_rss_mb()),
        "one": one_sim,
        "one_envoy": one_real,
        "one_client": one["last_wall"] - start,
        "one_nodes": len(affected),
        "one_envoys": len(real_affected),
        "one_touched": touched,
        "one_cpu": one_cpu,
        **{f"one_{stage}": at for stage, at in timeline.items()},
        "mesh": mesh_sim,
        "mesh_envoy": mesh_real,
        "mesh_client": mesh["last_wall"] - start2,
        "mesh_cpu": mesh_cpu,
        "mesh_nodes_cpu": nodes_cpu,
        "mesh_resources": mesh["resources"],
        **{f"mesh_{stage}": at for stage, at in mesh_timeline.items()},
        "stall": probe["max_stall"],
        **stall_phases(probe["waits"], start2, mesh_timeline),
        "probes": probe["answers"],
        "status": status,
        "status_nodes": status_nodes,
        "metrics": metrics,
    }


def cold_phases(
    t0: float, server: Server, connect_at: float, connected: Mapping[str, Any],
    cpu_cold: float, nodes_cpu: float,
) -> dict[str, float]:  # fmt: skip
    """Where a cold start's time goes: the server's launch to its first accepted connection
    (``cold_listen``; the nodes connect from then on, their streams waiting for the first
    compile), to its ready file (``cold_ready``: first compile done), to every node configured
    (``cold``); and the CPU each side spent: the server process, its compile worker, and the
    nodes' process (one Python process: its CPU is a floor on the cold start's wall time,
    whatever the server does)."""
    return {
        "cold_listen": connected["listening_wall"] - t0,
        "cold_ready": server.ready_at - t0,
        "cold_cpu_compiler": server.compiler_cpu_seconds(),
        "cold_cpu_nodes": nodes_cpu,
    }


def run_burst(
    topology: str, services: int, replicas: int, ads: str, processes: int, impl: str = "python"
) -> dict[str, Any]:
    """Only the cold start: every node connects at once; failed streams are retried after
    500 ms (as Envoy does) and counted by error, and the server log is searched for what it
    says about them. Then the same nodes against bench/fleet_floor.py's server, which costs
    nothing but gRPC: the floor under the cold start on this machine."""
    from bench.fleet_floor import measure_floor

    ps = policy_set(topology, services)
    with tempfile.TemporaryDirectory(prefix="meshward-bench-burst-") as tmp:
        work = Path(tmp)
        nodes = prepare(work, ps, replicas)
        with Launcher(work, quiet=True) as launcher:
            where = target(ps)
            worker = NodeFleet(work, launcher, where, ads, processes, impl=impl)
            t0 = time.time()
            server = Server(work, launcher, where.ads_port, wait=False)
            try:
                nodes_cpu0, connect_at = worker.cpu_seconds(), time.time()
                connected = worker.ask("connect retry listening")
                server.finish()
                phases = cold_phases(
                    t0, server, connect_at, connected, server.cpu_seconds(),
                    worker.cpu_seconds() - nodes_cpu0,
                )  # fmt: skip
                threads = server.cpu_by_thread()
                status, status_nodes, metrics = server.status_seconds()
            finally:
                worker.stop()
            log = server.log.read_text(errors="replace")
            if os.environ.get("MESHWARD_BENCH_KEEP_LOG"):
                Path(os.environ["MESHWARD_BENCH_KEEP_LOG"]).write_text(log)
            words = ("cancel", "refused", "not read", "Traceback", "reset", "timed out")
            found = {
                "nodes": len(nodes),
                "ads": ads,
                "nodes_impl": impl,
                "node_processes": processes,
                "cold": connected["all_configured_wall"] - t0,
                "cold_from_listen": connected["all_configured_wall"] - connected["listening_wall"],
                "cold_cpu": server.cpu_seconds(),
                "cold_cpu_threads": {k: round(v, 2) for k, v in threads.items()},
                **phases,
                "load_average": os.getloadavg(),
                "failures": connected["failures"],
                "failure_times (started s, lasted s, types received)": connected["failure_times"],
                "server_log": {w: log.count(w) for w in words},
                "rss": server.rss_mb(),
                "rss_worker": server.compiler_rss_mb(),
                "status": status,
                "status_nodes": status_nodes,
                "metrics": metrics,
            }
            server.stop()
            if os.environ.get("MESHWARD_BENCH_NO_FLOOR"):  # (A/B runs of the server alone)
                return found
            return {**found, **measure_floor(work, launcher, where, ads, processes, impl)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Example: python bench/xds_fleet.py --services 100,300 --replicas 2 "
        "(--topology worst --replicas 1 for the quadratic case; --envoys 0 without real Envoys)",
    )
    parser.add_argument("--topology", choices=["fleet", "worst"], default="fleet")
    parser.add_argument("--services", default="100,300", help="comma-separated sizes")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--envoys", type=int, default=10,
                        help="real Envoys (each under `meshward agent`) alongside (default 10)")  # fmt: skip
    parser.add_argument("--ads", choices=["sotw", "delta", "both"], default="delta",
                        help="the ADS variant of the simulated nodes and real Envoys: delta "
                        "(`meshward agent`'s default), sotw (`--sotw`), or both: each size in "
                        "both, interleaved, with delta's figures as ratios of SotW's "
                        "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object per size and round")
    parser.add_argument("--node-processes", type=int, default=2, metavar="K",
                        help="processes the simulated nodes are shared out over (default "
                        "%(default)s: one Python process is busy ~30 s of a 5,000-node cold "
                        "start, and would hold the figure to one core)")  # fmt: skip
    parser.add_argument("--nodes-impl", choices=["python", "node"], default="python",
                        help="the simulated nodes' implementation: bench/fleet_nodes.py, or "
                        "bench/fleet_js/fleet_nodes.js (Node.js; `make fleet-js` installs its "
                        "packages) (default: %(default)s)")  # fmt: skip
    parser.add_argument(
        "--burst-only",
        action="store_true",
        help="only the cold start: every node at once, failed streams retried and counted",
    )
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.services.split(",")]
    except ValueError:
        parser.error(f"--services: comma-separated integers, not {args.services!r}")
    if args.node_processes < 1:
        parser.error("--node-processes: at least 1")
    if args.burst_only:
        for _ in range(args.rounds):
            for n in sizes:
                found = run_burst(args.topology, n, args.replicas, args.ads, args.node_processes,
                                  args.nodes_impl)  # fmt: skip
                print(json.dumps({"services": n, "replicas": args.replicas, **found}), flush=True)
        return
    modes = ["sotw", "delta"] if args.ads == "both" else [args.ads]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {
        (n, mode): [] for n in sizes for mode in modes
    }
    for _ in range(args.rounds):
        for n in sizes:  # interleaved: every size (and variant) once per round
            for mode in modes:
                results[n, mode].append(run_size(
                    args.topology, n, args.replicas, args.envoys, mode, args.node_processes,
                    args.nodes_impl))  # fmt: skip
                if args.json:
                    print(json.dumps({"topology": args.topology, "replicas": args.replicas,
                                      **results[n, mode][-1]}), flush=True)  # fmt: skip
    if args.json:
        return
    for mode in modes:
        report(args.topology, args.replicas, args.rounds, sizes, mode,
               {n: results[n, mode] for n in sizes}, args.nodes_impl)  # fmt: skip
    if len(modes) > 1:
        compare_modes(sizes, {key: median_of(rs) for key, rs in results.items()})


if __name__ == "__main__":
    main()
