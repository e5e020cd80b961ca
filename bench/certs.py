"""How fast the CA issues SVIDs, and what each variant costs relative to plain issuance.

Measured side by side in one run (same process, same machine load), so the ratios are what to
compare across machines; absolute rates move with the load of the shared cores.

    python bench/certs.py [--count 1000] [--e2e-count 500] [--agent-starts 3]

The end-to-end rows run `meshward xds serve --secrets agent` as a process and call it as agents
do (a new TLS connection per call, the CSR made on the agent's side beforehand): joins with a
token over server-authenticated TLS, renewals over mTLS; 16 calls in flight. Per-identity limits
are lifted for that server (they would otherwise be what is measured). "agent start -> Envoy
ready" starts a real `meshward agent` (join, SDS, Envoy) and waits for Envoy's /ready.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
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


def _rate(label: str, count: int, work: Callable[[int], object]) -> float:
    start = time.perf_counter()
    for i in range(count):
        work(i)
    elapsed = time.perf_counter() - start
    rate = count / elapsed
    print(
        f"  {label:<44} {rate:>9,.0f}/s   {elapsed * 1e3 / count:7.3f} ms each   ({elapsed:.2f}s)"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--e2e-count", type=int, default=500, help="0: skip the end-to-end rows")
    parser.add_argument("--agent-starts", type=int, default=3)
    args = parser.parse_args()
    count = args.count

    ca = CertificateAuthority.ephemeral(TD)
    bundle = ca.trust_bundle()
    ids = _ids(count)
    csrs = [_csr(i) for i in ids]  # made up front: the key stays with the workload
    ca.issue(ids[0])  # warm up

    print(f"meshward.certs: {count} SVIDs per row (ECDSA P-256, 1h TTL)")
    issue = _rate("issue (new key + sign + PEM)", count, lambda i: ca.issue(ids[i]))
    csr = _rate(
        "issue_for_csr (verify CSR + sign)", count, lambda i: ca.issue_for_csr(csrs[i], ids[i])
    )
    svids = [ca.issue(i) for i in ids]
    verify = _rate(
        "verify_svid (cryptography verifier)",
        count,
        lambda i: verify_svid(svids[i].cert_chain_pem, bundle),
    )
    sds = _rate(
        "workload_secrets (issue + validate SDS pair)",
        count,
        lambda i: workload_secrets(ca, ids[i]),
    )

    print("ratios (same run):")
    print(f"  CSR signing vs issuance:              {csr / issue:5.2f}x the rate")
    print(f"  verification vs issuance:             {verify / issue:5.2f}x the rate")
    print(f"  SDS pair (issue+validate) vs issuance: {sds / issue:5.2f}x the rate")
    print(f"issuing {count} SVIDs took {count / issue:.2f}s")
    if args.e2e_count:
        e2e_main(args.e2e_count, args.agent_starts)


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


async def _calls(count: int, make: Callable[[int], Awaitable[object]]) -> float:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with gate:
            await make(i)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return count / (time.perf_counter() - start)


def end_to_end(count: int) -> tuple[float, float]:
    from meshward.agent.certclient import JOIN, RENEW, call, mtls_context, server_only_context
    from meshward.agent.identity import Credentials, key_pem, make_csr, new_key
    from meshward.certs.jointoken import load_or_create_key, mint

    with tempfile.TemporaryDirectory(prefix="mw-bench-") as name:
        tmp = Path(name)
        with Launcher(tmp, quiet=True) as launcher:
            ready = _serve(tmp, launcher)
            server_id = ready["server_identity"]
            roots = CertificateAuthority.load(tmp / "ca").trust_bundle().roots_pem
            join_key = load_or_create_key(tmp / "ca")
            refs = [f"bench/w{i % WORKLOADS}" for i in range(count)]
            ids = [f"spiffe://{TD}/ns/bench/sa/w{i % WORKLOADS}" for i in range(count)]
            keys = [new_key() for _ in range(count)]
            csrs = [make_csr(k, i).decode() for k, i in zip(keys, ids, strict=True)]
            tokens = [mint(join_key, r, ttl=timedelta(minutes=10)) for r in refs]
            server_ctx = server_only_context(roots)
            held: dict[int, Credentials] = {}

            async def join(i: int) -> None:
                reply = await call(
                    ready["join"], JOIN,
                    {"workload": refs[i], "csr": csrs[i], "token": tokens[i], "instance": str(i)},
                    context=server_ctx, server_id=server_id,
                )  # fmt: skip
                if i < WORKLOADS:
                    held[i] = Credentials.build(key_pem(keys[i]), reply["cert_chain"].encode(),
                                                reply["trust_bundle"].encode(), "bench")  # fmt: skip

            joins = asyncio.run(_calls(count, join))
            contexts = {
                i: mtls_context(c.chain_pem, c.key_pem, c.bundle_pem) for i, c in held.items()
            }

            async def renew(i: int) -> None:
                await call(
                    ready["ads"], RENEW,
                    {"workload": refs[i], "csr": csrs[i], "instance": str(i)},
                    context=contexts[i % WORKLOADS], server_id=server_id,
                )  # fmt: skip

            renewals = asyncio.run(_calls(count, renew))
    return joins, renewals


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


def e2e_main(count: int, starts: int) -> None:
    print(f"end to end (agent -> control plane process), {count} SVIDs per row, "
          f"{CONCURRENCY} in flight:")  # fmt: skip
    joins, renewals = end_to_end(count)
    print(f"  join (token, TLS, CSR, sign, spent-id write) {joins:>9,.0f} SVIDs/s")
    print(f"  renew (mTLS with the SVID, CSR, sign)        {renewals:>9,.0f} SVIDs/s")
    if starts:
        times = agent_start_to_ready(starts)
        print(f"  agent start -> Envoy ready (join included): median {statistics.median(times):.2f}s"
              f" over {starts} starts (min {min(times):.2f}s, max {max(times):.2f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
