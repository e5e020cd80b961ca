"""What the flow collector costs per access-log entry, relative to receiving the same entries
and doing nothing with them.

One control plane in this process (real mTLS gRPC ALS), one client sending batches of 500
HTTP entries (the size Envoy's 16 KiB buffer flushes are in the same range). Rounds alternate
between the real collector (parse -> record -> store.add) and a no-op handler that only reads
the messages, so both see the same machine load; the ratio is what to compare.

    python bench/flows.py [--entries 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from meshward.certs import CertificateAuthority
from meshward.certs.client_tls import client_ssl_context
from meshward.compile import CompileOptions
from meshward.flows.collector import CollectorLimits
from meshward.flows.service import FlowService, flows_for
from meshward.policy import load
from meshward.testing import als
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsServiceThread

POLICY = """apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, rootNamespace: meshward-system}
---
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="meshward-bench-flows-"))
    (base / "mesh.yaml").write_text(POLICY)
    load([base / "mesh.yaml"])
    ca = CertificateAuthority.ephemeral("cluster.local")
    with XdsServiceThread(
        None, ca, compiler_for(CompileOptions()), policy_paths=[base / "mesh.yaml"],
        flows=flows_for(str(base / "flows.db")),
    ) as xds:  # fmt: skip
        assert xds.service is not None
        flows = xds.service.flows
        assert isinstance(flows, FlowService)  # flows_for above
        collector = flows.collector
        collector.limits = CollectorLimits(rate=1e12, burst=1e12)
        svid = ca.issue("spiffe://cluster.local/ns/shop/sa/orders")
        roots = ca.trust_bundle().roots_pem
        context = client_ssl_context(svid.cert_chain_pem, svid.private_key_pem, roots)
        batch = [
            als.http_entry("shop/orders", path=f"/orders/{i}",
                           principal="spiffe://cluster.local/ns/shop/sa/frontend")
            for i in range(500)
        ]  # fmt: skip
        messages = [als.message("shop/orders", batch)] + [
            als.message(None, batch) for _ in range(max(1, args.entries // 500) - 1)
        ]
        total = 500 * len(messages)
        real_record = collector._record

        def no_op(entry: object, node: object) -> None:
            return None

        rates: dict[str, list[float]] = {"collector": [], "no-op": []}
        for _ in range(args.rounds):
            for name in ("collector", "no-op"):
                record = real_record if name == "collector" else no_op
                collector._record = record  # type: ignore[method-assign]
                started = time.perf_counter()
                status, _ = asyncio.run(als.send("127.0.0.1", xds.port, context, messages))
                elapsed = time.perf_counter() - started
                assert status == "OK", status
                rates[name].append(total / elapsed)
        collector._record = real_record  # type: ignore[method-assign]
        started = time.perf_counter()
        written = flows.store.flush()
        flush_ms = (time.perf_counter() - started) * 1000
    best = {name: max(values) for name, values in rates.items()}
    print(f"meshward.flows: {total} HTTP entries per round, {args.rounds} rounds (best shown)")
    for name, rate in best.items():
        print(f"  {name:<10} {rate:>10,.0f} entries/s")
    print(f"  collector / no-op: {best['collector'] / best['no-op']:.2f}")
    print(f"  store flush: {written} flows in {flush_ms:.1f} ms (SQLite)")


if __name__ == "__main__":
    main()
