"""How fast the CA issues SVIDs, and what each variant costs relative to plain issuance.

Measured side by side in one run (same process, same machine load), so the ratios are what to
compare across machines; absolute rates move with the load of the shared cores.

    python bench/certs.py [--count 1000] [--e2e-count 500] [--e2e-rounds 2] [--agent-starts 3]
                          [--clients 2] [--baseline SRC]

The end-to-end rows run `meshward xds serve --secrets agent` as a process and call it as agents
do, from --clients processes simulating 100 agents (one Python client would measure itself),
16 calls in flight, CSRs made on the agents' side beforehand:

- join: a new server-authenticated TLS connection per join (first contact; the spent token is
  durably recorded before the SVID leaves);
- renew: each agent presents the SVID it holds on a new mTLS connection and renews it, then
  holds the new SVID: one handshake per SVID, as a real renewal costs (the agent's connection
  presents its certificate, so a new certificate needs a new connection);
- renew on an open connection: the Renew RPC alone (the handshake's share of the row above);
- bundle polls (every agent, every 30 s): on the agent's open connection, as agents poll now,
  and on a new connection per poll, as they did before.

Per-identity limits are lifted for that server (they would otherwise be what is measured).
Besides calls/s, each row gives the control plane's own CPU time per call (from /proc) and
the share of its Python thread (the event loop; the rest is gRPC core's threads: TLS, HTTP/2):
CPU per call does not depend much on what else the shared cores run, calls/s does. The agents'
CPU per call (the client processes': TLS context per SVID, handshake, HTTP/2 in Python) is
given too, and two bounds from these CPU figures: the control plane alone on this machine's
cores (its Python thread can use one of them at most), and control plane and agents sharing
the cores, as in this run (calls/s approaches it when the machine is otherwise idle).
--baseline SRC runs the same rows against a second control plane from another checkout (SRC
holds its meshward/ package), the two interleaved row by row, and prints the CPU ratio.
"agent start -> Envoy ready" starts a real `meshward agent` (join, SDS, Envoy) and waits for
Envoy's /ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.certs.ca import CertificateAuthority
from meshward.certs.sds import workload_secrets
from meshward.certs.verify import verify_svid
from meshward.testing.processes import Launcher, meshward_argv

TD = "cluster.local"


def _ids(count: int) -> list[str]:
    return [f"spiffe://{TD}/ns/ns{i % 50}/sa/sa{i}" for i in range(count)]


def _csr(spiffe_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _interleaved(
    variants: list[tuple[str, Callable[[int], object]]], count: int, rounds: int
) -> dict[str, float]:
    """Each variant's rate (median over ``rounds``), the rounds interleaved: every variant runs
    a slice of ``count // rounds`` items per round, in an order rotated each round, so a change
    of machine load during the run moves every variant alike (the ratios are what is compared).
    Also the CPU time per item (this process's), which the load of the shared cores inflates
    much less than wall time: the figure to hold against the end-to-end rows' CPU per call."""
    chunk = max(1, count // rounds)
    rates: dict[str, list[float]] = {label: [] for label, _ in variants}
    cpu: dict[str, list[float]] = {label: [] for label, _ in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for label, work in variants[shift:] + variants[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            for i in range(r * chunk, (r + 1) * chunk):
                work(i)
            rates[label].append(chunk / (time.perf_counter() - start))
            cpu[label].append((time.process_time() - start_cpu) * 1e3 / chunk)
    out: dict[str, float] = {}
    for label, _ in variants:
        rate = statistics.median(rates[label])
        print(
            f"  {label:<44} {rate:>9,.0f}/s   {1e3 / rate:7.3f} ms each, "
            f"CPU {statistics.median(cpu[label]):.3f} ms   "
            f"(min {min(rates[label]):,.0f}/s, max {max(rates[label]):,.0f}/s over {rounds} rounds)"
        )
        out[label] = rate
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per row")
    parser.add_argument("--e2e-count", type=int, default=500, help="0: skip the end-to-end rows")
    parser.add_argument("--agent-starts", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2,
                        help="client processes for the end-to-end rows (agents are many)")  # fmt: skip
    parser.add_argument("--e2e-rounds", type=int, default=2,
                        help="interleaved rounds of the end-to-end rows")  # fmt: skip
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="also run the end-to-end rows against the control plane of another "
                        "checkout (the directory holding its meshward/ package), interleaved, "
                        "and print this one's CPU per call relative to it")  # fmt: skip
    args = parser.parse_args()
    if args.e2e_count and args.e2e_count < WORKLOADS:
        parser.error(f"--e2e-count must be at least {WORKLOADS} (one call per simulated agent)")
    if args.baseline and not (args.baseline / "meshward" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no meshward/ package there")
    count = args.count

    ca = CertificateAuthority.ephemeral(TD)
    bundle = ca.trust_bundle()
    ids = _ids(count)
    csrs = [_csr(i) for i in ids]  # made up front: the key stays with the workload
    ca.issue(ids[0])  # warm up
    svids = [ca.issue(i) for i in ids]

    print(
        f"meshward.certs: {count} SVIDs per row (ECDSA P-256, 1h TTL), "
        f"{args.rounds} interleaved rounds"
    )
    rows = _interleaved(
        [
            ("issue (new key + sign + PEM)", lambda i: ca.issue(ids[i])),
            ("issue_for_csr (verify CSR + sign)", lambda i: ca.issue_for_csr(csrs[i], ids[i])),
            (
                "verify_svid (cryptography verifier)",
                lambda i: verify_svid(svids[i].cert_chain_pem, bundle),
            ),
            (
                "workload_secrets (issue + validate SDS pair)",
                lambda i: workload_secrets(ca, ids[i]),
            ),
        ],
        count,
        args.rounds,
    )
    issue, csr, verify, sds = rows.values()

    print("ratios (same run):")
    print(f"  CSR signing vs issuance:              {csr / issue:5.2f}x the rate")
    print(f"  verification vs issuance:             {verify / issue:5.2f}x the rate")
    print(f"  SDS pair (issue+validate) vs issuance: {sds / issue:5.2f}x the rate")
    print(f"issuing {count} SVIDs took {count / issue:.2f}s")
    if args.e2e_count:
        e2e_main(args.e2e_count, args.agent_starts, args.clients, args.baseline, args.e2e_rounds)


WORKLOADS = 100
CONCURRENCY = 16


def _policy(directory: Path) -> None:
    directory.mkdir(parents=True)
    docs = [
        f"apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {{name: w{i}, namespace: bench}}\n"
        "spec:\n  ports: [{name: http, port: 8080, protocol: HTTP}]\n"
        for i in range(WORKLOADS)
    ]
    (directory / "mesh.yaml").write_text("---\n".join(docs))


def _serve(tmp: Path, launcher: Launcher, name: str, src: Path | None) -> dict[str, Any]:
    """A control plane process; ``src``: run that checkout's meshward instead (--baseline)."""
    # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (this checkout)
    # ahead of PYTHONPATH, and the baseline would run this code.
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONSAFEPATH": "1"} if src else None
    return launcher.start(name, meshward_argv(
        "xds", "serve", "--policy", str(tmp / "policy"),
        "--ca", str(tmp / "ca"), "--listen", "127.0.0.1:0", "--admin", "off",
        "--secrets", "agent", "--join-listen", "127.0.0.1:0", "--access-log", "off",
        "--svid-rate", "1000000", "--svid-burst", "1000000", "--max-instances", "1000000",
        "--ready-file", str(tmp / f"{name}.ready.json"),
    ), ready_path=tmp / f"{name}.ready.json", env=env, timeout=60)  # fmt: skip


def _floor_server(ca_dir: str, server_id: str, port: Any, ready: Any) -> None:
    """The transport floor: gRPC aio on a new mTLS connection per call, as the control plane
    listens (client certificate required and verified against the mesh roots), whose Renew
    reads the caller's certificate and returns a reply of a real one's size without signing
    anything. What is left of a renewal's CPU when Meshward's handler costs nothing."""
    import grpc

    from meshward.xds.certservice import RENEW, SERVICE

    ca = CertificateAuthority.load(Path(ca_dir))
    svid = ca.issue(server_id)
    reply = json.dumps({"cert_chain": "x" * 1400, "trust_bundle": "x" * 700}).encode()

    async def renew(request: bytes, context: Any) -> bytes:
        context.auth_context()
        return reply

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            SERVICE, {RENEW: grpc.unary_unary_rpc_method_handler(renew)}),))  # fmt: skip
        credentials = grpc.ssl_server_credentials(
            [(svid.private_key_pem, svid.cert_chain_pem)],
            root_certificates=ca.trust_bundle().roots_pem,
            require_client_auth=True,
        )
        port.value = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """CPU time of process ``pid`` (or of its thread ``tid``), from /proc."""
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The end-to-end rows. Agents are simulated by the client processes: agent ``a`` (of
# WORKLOADS) makes calls a, a + WORKLOADS, a + 2 * WORKLOADS, ... one after the other, as one
# agent does; CONCURRENCY calls are in flight over all agents.
JOIN_ROW = "join"  # a new connection (server-authenticated TLS) per join: first contact
RENEW_ROW = "renew"  # new SVID -> new mTLS connection presenting it -> Renew: every renewal
RENEW_OPEN_ROW = "renew-open"  # Renew on a connection already open: the RPC without handshake
POLL_OPEN_ROW = "poll-open"  # Bundle on the agent's open connection (every 30 s, today)
POLL_NEW_ROW = "poll-new"  # Bundle on a new connection per poll (what agents did before)
FLOOR = "transport floor"  # the renew row's calls against _floor_server
ROWS = {
    JOIN_ROW: "join (new TLS conn, token, CSR, sign, fsync)",
    RENEW_ROW: "renew (new SVID -> new mTLS conn, CSR, sign)",
    RENEW_OPEN_ROW: "renew on an open conn (no handshake)",
    POLL_OPEN_ROW: "bundle poll on the open conn (agents now)",
    POLL_NEW_ROW: "bundle poll, new conn each (agents before)",
}


def _client(job: dict[str, Any]) -> tuple[list[tuple[int, str, str]], float]:
    """One client process: its agents' share of the calls; the replies later rows need (the
    SVID each agent holds after the row: chain, bundle) and the CPU seconds this process spent
    on its calls (the agents' side: TLS contexts, handshakes, HTTP/2 in Python)."""
    from meshward.agent.certclient import (
        BUNDLE,
        JOIN,
        RENEW,
        CertChannel,
        call,
        mtls_context,
        server_only_context,
    )

    row, agents = job["row"], job["agents"]
    started = [0.0]
    held = dict(job["held"])  # agent -> (index of its key, chain, bundle)

    def context(agent: int) -> Any:
        index, chain, bundle = held[agent]
        return mtls_context(chain.encode(), job["key_pems"][index], bundle.encode())

    async def run() -> None:
        gate = asyncio.Semaphore(job["in_flight"])
        channels: dict[int, CertChannel] = {}
        if row in (RENEW_OPEN_ROW, POLL_OPEN_ROW):  # open before the clock starts
            for agent in agents:
                channels[agent] = CertChannel(
                    job["address"], context=context(agent), server_id=job["server_id"]
                )
                await channels[agent].call(BUNDLE, {})
        job["ready"].wait()
        started[0] = time.process_time()

        async def one(agent: int, i: int) -> None:
            message = {"workload": job["refs"][i], "csr": job["csrs"][i], "instance": str(i)}
            if row == JOIN_ROW:
                message["token"] = job["tokens"][i]
                reply = await call(job["address"], JOIN, message,
                                   context=server_only_context(job["roots"]),
                                   server_id=job["server_id"])  # fmt: skip
            elif row == RENEW_ROW:  # a channel presenting the SVID held now, as the agent does
                reply = await call(job["address"], RENEW, message, context=context(agent),
                                   server_id=job["server_id"])  # fmt: skip
            elif row == RENEW_OPEN_ROW:
                reply = await channels[agent].call(RENEW, message)
            elif row == POLL_OPEN_ROW:
                await channels[agent].call(BUNDLE, {})
                return
            else:
                await call(job["address"], BUNDLE, {}, context=context(agent),
                           server_id=job["server_id"])  # fmt: skip
                return
            if row != RENEW_OPEN_ROW and not job.get("floor"):  # the floor signs nothing
                held[agent] = (i, reply["cert_chain"], reply["trust_bundle"])

        async def agent_calls(agent: int) -> None:
            for i in range(agent, job["count"], WORKLOADS):
                async with gate:
                    await one(agent, i)

        await asyncio.gather(*(agent_calls(a) for a in agents))
        for channel in channels.values():
            channel.close()

    asyncio.run(run())
    return [held[agent] for agent in agents], time.process_time() - started[0]


def _phase(
    pool: Any, manager: Any, pid: int, clients: int, job: dict[str, Any]
) -> tuple[float, float, float, float, dict[int, tuple[int, str, str]]]:
    """(calls/s, control-plane CPU ms per call, of which its Python thread's (the event loop;
    the rest is gRPC core's threads: TLS, HTTP/2), the clients' CPU ms per call, what every
    agent holds after) for the
    ``job["count"]`` calls of one row, spread over ``clients`` processes. The clock starts once
    every client is set up (contexts built, open-connection rows connected)."""
    ready = manager.Event()
    jobs = [
        {
            **job,
            "agents": list(range(k, WORKLOADS, clients)),
            "ready": ready,
            "in_flight": CONCURRENCY // clients,
        }
        for k in range(clients)
    ]
    futures = [pool.submit(_client, j) for j in jobs]
    time.sleep(0.5 if job["row"] not in (RENEW_OPEN_ROW, POLL_OPEN_ROW) else 3.0)
    cpu, main = _cpu_seconds(pid), _cpu_seconds(pid, pid)
    start = time.perf_counter()
    ready.set()
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - start
    count = job["count"]
    cpu_ms = (_cpu_seconds(pid) - cpu) * 1e3 / count
    main_ms = (_cpu_seconds(pid, pid) - main) * 1e3 / count
    held = {i % WORKLOADS: (i, chain, bundle) for r, _ in results for i, chain, bundle in r}
    client_ms = sum(c for _, c in results) * 1e3 / count
    return count / elapsed, cpu_ms, main_ms, client_ms, held


def end_to_end(
    count: int, clients: int, variants: dict[str, Path | None], rounds: int
) -> dict[tuple[str, str], list[tuple[float, float, float, float]]]:
    """Every row against every control plane variant, the variants interleaved row by row
    and round by round: {(variant, row): [(calls/s, CPU ms per call, of which the Python
    thread's) per round]}."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from meshward.agent.identity import key_pem, make_csr, new_key
    from meshward.certs.jointoken import load_or_create_key, mint

    out: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mw-bench-") as name:
        tmp = Path(name)
        _policy(tmp / "policy")
        CertificateAuthority.init(tmp / "ca", TD)
        with Launcher(tmp, quiet=True) as launcher, ProcessPoolExecutor(clients) as pool, \
                multiprocessing.Manager() as manager:  # fmt: skip
            ready = {v: _serve(tmp, launcher, v, src) for v, src in variants.items()}
            pids = {v: launcher[v].pid for v in variants}
            spawn = multiprocessing.get_context("spawn")  # grpc must not be forked
            floor_port, floor_ready = spawn.Value("i", 0), spawn.Event()
            server_id = ready["this"]["server_identity"]
            floor = spawn.Process(target=_floor_server, daemon=True,
                                            args=(str(tmp / "ca"), server_id, floor_port,
                                                  floor_ready))  # fmt: skip
            floor.start()
            if not floor_ready.wait(60):
                raise RuntimeError("the transport-floor server did not start")
            join_key = load_or_create_key(tmp / "ca")
            refs = [f"bench/w{i % WORKLOADS}" for i in range(count)]
            ids = [f"spiffe://{TD}/ns/bench/sa/w{i % WORKLOADS}" for i in range(count)]
            keys = [new_key() for _ in range(count)]
            base = {
                "count": count,
                "refs": refs,
                "csrs": [make_csr(k, i).decode() for k, i in zip(keys, ids, strict=True)],
                "key_pems": [key_pem(k) for k in keys],
                "roots": CertificateAuthority.load(tmp / "ca").trust_bundle().roots_pem,
            }
            for r in range(rounds):
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for row in ROWS:
                    for v in order:
                        pid = pids[v]
                        assert pid is not None
                        job = {**base, "row": row, "server_id": ready[v]["server_identity"],
                               "held": ready[v].get("_held", {})}  # fmt: skip
                        if row == JOIN_ROW:
                            job["address"] = ready[v]["join"]
                            job["tokens"] = [mint(join_key, x, ttl=timedelta(minutes=10))
                                             for x in refs]  # fmt: skip
                        else:
                            job["address"] = ready[v]["ads"]
                        rate, cpu_ms, main_ms, client_ms, held = _phase(
                            pool, manager, pid, clients, job
                        )
                        if row in (JOIN_ROW, RENEW_ROW):
                            ready[v]["_held"] = held
                        out.setdefault((v, row), []).append((rate, cpu_ms, main_ms, client_ms))
                        if row == RENEW_ROW and v == "this":  # the same calls, no handler
                            job = {**job, "address": f"127.0.0.1:{floor_port.value}",
                                   "floor": True, "held": held}  # fmt: skip
                            assert floor.pid is not None
                            f_rate, f_cpu, f_main, f_client, _ = _phase(
                                pool, manager, floor.pid, clients, job
                            )
                            out.setdefault((FLOOR, RENEW_ROW), []).append(
                                (f_rate, f_cpu, f_main, f_client)
                            )
            floor.terminate()
            floor.join()
    return out


def agent_start_to_ready(starts: int) -> list[float]:
    """Seconds from `meshward agent` start (join included) to Envoy's /ready LIVE."""
    from meshward.envoy.admin import AdminClient
    from meshward.testing.mesh import Mesh

    results: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mw-bench-") as name:
        tmp = Path(name)
        (tmp / "policy").mkdir()
        (tmp / "policy" / "mesh.yaml").write_text(
            "apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {name: orders, namespace: "
            "shop}\nspec:\n  ports: [{name: http, port: 8080, protocol: HTTP}]\n"
        )
        ref = "shop/orders"
        with Mesh(tmp / "policy", tmp, [ref]) as mesh:
            for _ in range(starts):
                mesh.stop_agent(ref)
                shutil.rmtree(mesh.state_dir(ref))
                start = time.perf_counter()
                mesh.start_agent(ref, join=True)
                admin = AdminClient(mesh.state_dir(ref) / "admin.sock")
                while True:
                    try:
                        status, body = admin.get("/ready", timeout=1.0)
                        if status == 200 and body.strip() == "LIVE":
                            break
                    except OSError:
                        pass
                    time.sleep(0.01)
                results.append(time.perf_counter() - start)
    return results


def _print_row(label: str, runs: list[tuple[float, float, float, float]]) -> None:
    rate = statistics.median(r[0] for r in runs)
    cpu_ms = statistics.median(r[1] for r in runs)
    main_ms = statistics.median(r[2] for r in runs)
    client_ms = statistics.median(r[3] for r in runs)
    # Bounds from CPU per call (what a saturated run approaches): the control plane alone
    # gets at most every core, and its one Python thread (the GIL) at most one; with the
    # agents on the same cores, both sides share them.
    cores = os.cpu_count() or 1
    alone = min(cores * 1e3 / cpu_ms, 1e3 / main_ms)
    shared = cores * 1e3 / (cpu_ms + client_ms)
    print(f"  {label:<56} {rate:>6,.0f}/s   control plane CPU {cpu_ms:.2f} ms "
          f"each ({main_ms:.2f} Python thread), agents' {client_ms:.2f} ms; "
          f"{cores} cores: control plane alone <= {alone:,.0f}/s, "
          f"with the agents <= {shared:,.0f}/s")  # fmt: skip


def e2e_main(count: int, starts: int, clients: int, baseline: Path | None, rounds: int) -> None:
    variants: dict[str, Path | None] = {"this": None}
    if baseline is not None:
        variants = {"baseline": baseline.resolve(), "this": None}
    print(f"end to end (agent -> control plane process), {count} calls per row and round, "
          f"{CONCURRENCY} in flight from {clients} client processes as {WORKLOADS} agents, "
          f"{rounds} interleaved rounds (median):")  # fmt: skip
    rows = end_to_end(count, clients, variants, rounds)
    for row, label in ROWS.items():
        for v in variants:
            who = f"[{v}] " if len(variants) > 1 else ""
            _print_row(who + label, rows[(v, row)])
        if (FLOOR, row) in rows:
            _print_row(f"[{FLOOR}] the same, empty handler", rows[(FLOOR, row)])
    if len(variants) > 1:
        print("control plane CPU per call, this vs baseline (same run):")
        for row, label in ROWS.items():
            this = statistics.median(r[1] for r in rows[("this", row)])
            before = statistics.median(r[1] for r in rows[("baseline", row)])
            print(f"  {label:<48} {this / before:5.2f}x")
    if starts:
        times = agent_start_to_ready(starts)
        print(f"  agent start -> Envoy ready (join included): median {statistics.median(times):.2f}s"
              f" over {starts} starts (min {min(times):.2f}s, max {max(times):.2f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
