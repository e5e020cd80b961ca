"""How fast the CA issues SVIDs, and what each variant costs relative to plain issuance.

Measured side by side in one run (same process, same machine load), so the ratios are what to
compare across machines; absolute rates move with the load of the shared cores.

    python bench/certs.py [--count 1000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.certs.ca import CertificateAuthority
from meshward.certs.sds import workload_secrets
from meshward.certs.verify import verify_svid

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
    count = parser.parse_args().count

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


if __name__ == "__main__":
    main()
