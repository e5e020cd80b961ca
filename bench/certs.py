"""How fast the CA issues SVIDs, and what each variant costs relative to plain issuance.

Measured side by side in one run (same process, same machine load), so the ratios are what to
compare across machines; absolute rates move with the load of the shared cores.

    python bench/certs.py [--count 1000] [--e2e-count 500] [--agent-starts 3] [--clients 2]

The end-to-end rows run `meshward xds serve --secrets agent` as a process and call it as agents
do (a new TLS connection per call, the CSR made on the agent's side beforehand) from --clients
processes (agents are many; one Python client would measure itself): joins with a token over
server-authenticated TLS (the spent token durably recorded before the SVID leaves), renewals
over mTLS; 16 calls in flight. Per-identity limits are lifted for that server (they would
otherwise be what is measured). Besides SVIDs/s, each row gives the control plane's own CPU
time per SVID (from /proc), which does not depend on what else the shared cores run. "agent start -> Envoy
ready" starts a real `meshward agent` (join, SDS, Envoy) and waits for Envoy's /ready.
"""

from __future__ import annotations

import argparse
import asyncio
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
    of machine load during the run moves every variant alike (the ratios are what is compared)."""
    chunk = max(1, count // rounds)
    rates: dict[str, list[float]] = {label: [] for label, _ in variants}
    for r in range(rounds):
        shift = r % len(variants)
        for label, work in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            for i in range(r * chunk, (r + 1) * chunk):
                work(i)
            rates[label].append(chunk / (time.perf_counter() - start))
    out: dict[str, float] = {}
    for label, _ in variants:
        rate = statistics.median(rates[label])
        print(
            f"  {label:<44} {rate:>9,.0f}/s   {1e3 / rate:7.3f} ms each   "
            f"(min {min(rates[label]):,.0f}, max {max(rates[label]):,.0f} over {rounds} rounds)"
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
    args = parser.parse_args()
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
        e2e_main(args.e2e_count, args.agent_starts, args.clients)


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


def _serve(tmp: Path, launcher: Launcher) -> dict[str, Any]:
    _policy(tmp / "policy")
    CertificateAuthority.init(tmp / "ca", TD)
    return launcher.start("xds", meshward_argv(
        "xds", "serve", "--policy", str(tmp / "policy"),
        "--ca", str(tmp / "ca"), "--listen", "127.0.0.1:0", "--admin", "off",
        "--secrets", "agent", "--join-listen", "127.0.0.1:0", "--access-log", "off",
        "--svid-rate", "1000000", "--svid-burst", "1000000", "--max-instances", "1000000",
        "--ready-file", str(tmp / "ready.json"),
    ), ready_path=tmp / "ready.json", timeout=60)  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client(job: dict[str, Any]) -> list[tuple[int, str, str]]:
    """One client process: its share of the calls, CONCURRENCY // clients in flight; the
    replies it needs later (the first WORKLOADS joins' chains, for the renewals)."""
    from meshward.agent.certclient import JOIN, call, mtls_context, server_only_context

    held: list[tuple[int, str, str]] = []
    if job["method"] == JOIN:
        context = server_only_context(job["roots"])
    else:
        contexts = {w: mtls_context(*pems) for w, pems in job["credentials"].items()}

    async def one(i: int) -> None:
        message = {"workload": job["refs"][i], "csr": job["csrs"][i], "instance": str(i)}
        if job["method"] == JOIN:
            message["token"] = job["tokens"][i]
        reply = await call(
            job["address"], job["method"], message,
            context=context if job["method"] == JOIN else contexts[i % WORKLOADS],
            server_id=job["server_id"],
        )  # fmt: skip
        if job["method"] == JOIN and i < WORKLOADS:
            held.append((i, reply["cert_chain"], reply["trust_bundle"]))

    async def run() -> None:
        gate = asyncio.Semaphore(job["in_flight"])

        async def gated(i: int) -> None:
            async with gate:
                await one(i)

        await asyncio.gather(*(gated(i) for i in job["indices"]))

    asyncio.run(run())
    return held


def _phase(
    pool: Any, pid: int, clients: int, count: int, job: dict[str, Any]
) -> tuple[float, float, list[tuple[int, str, str]]]:
    """(SVIDs/s, control-plane CPU ms per SVID, held replies) for ``count`` calls spread over
    ``clients`` processes."""
    jobs = [
        {**job, "indices": list(range(k, count, clients)), "in_flight": CONCURRENCY // clients}
        for k in range(clients)
    ]
    cpu = _cpu_seconds(pid)
    start = time.perf_counter()
    results = list(pool.map(_client, jobs))
    elapsed = time.perf_counter() - start
    cpu_ms = (_cpu_seconds(pid) - cpu) * 1e3 / count
    return count / elapsed, cpu_ms, [h for r in results for h in r]


def end_to_end(count: int, clients: int) -> dict[str, tuple[float, float]]:
    from concurrent.futures import ProcessPoolExecutor

    from meshward.agent.certclient import JOIN, RENEW
    from meshward.agent.identity import key_pem, make_csr, new_key
    from meshward.certs.jointoken import load_or_create_key, mint

    with tempfile.TemporaryDirectory(prefix="mw-bench-") as name:
        tmp = Path(name)
        with Launcher(tmp, quiet=True) as launcher, ProcessPoolExecutor(clients) as pool:
            ready = _serve(tmp, launcher)
            pid = launcher["xds"].pid
            assert pid is not None
            join_key = load_or_create_key(tmp / "ca")
            refs = [f"bench/w{i % WORKLOADS}" for i in range(count)]
            ids = [f"spiffe://{TD}/ns/bench/sa/w{i % WORKLOADS}" for i in range(count)]
            keys = [new_key() for _ in range(count)]
            csrs = [make_csr(k, i).decode() for k, i in zip(keys, ids, strict=True)]
            base = {"refs": refs, "csrs": csrs, "server_id": ready["server_identity"]}
            join_job = {
                **base,
                "method": JOIN,
                "address": ready["join"],
                "tokens": [mint(join_key, r, ttl=timedelta(minutes=10)) for r in refs],
                "roots": CertificateAuthority.load(tmp / "ca").trust_bundle().roots_pem,
            }
            joins, join_cpu, held = _phase(pool, pid, clients, count, join_job)
            credentials = {
                i: (chain.encode(), key_pem(keys[i]), bundle.encode()) for i, chain, bundle in held
            }
            renew_job = {**base, "method": RENEW, "address": ready["ads"],
                         "credentials": credentials}  # fmt: skip
            renewals, renew_cpu, _ = _phase(pool, pid, clients, count, renew_job)
    return {"join": (joins, join_cpu), "renew": (renewals, renew_cpu)}


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


def e2e_main(count: int, starts: int, clients: int) -> None:
    print(f"end to end (agent -> control plane process), {count} SVIDs per row, "
          f"{CONCURRENCY} in flight from {clients} client processes:")  # fmt: skip
    rows = end_to_end(count, clients)
    labels = {
        "join": "join (token, TLS, CSR, sign, spent-id fsync)",
        "renew": "renew (mTLS with the SVID, CSR, sign)",
    }
    for key, (rate, cpu_ms) in rows.items():
        print(f"  {labels[key]:<46} {rate:>7,.0f} SVIDs/s   control plane CPU {cpu_ms:.2f} ms "
              f"per SVID (~{1e3 / cpu_ms:,.0f}/s per core it has)")  # fmt: skip
    if starts:
        times = agent_start_to_ready(starts)
        print(f"  agent start -> Envoy ready (join included): median {statistics.median(times):.2f}s"
              f" over {starts} starts (min {min(times):.2f}s, max {max(times):.2f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
