"""The workload key and SVID as the agent holds them: born here, kept here (0600), never sent.

On disk (the agent's ``--dir``, 0700)::

    svid.pem     0600  the private key of the current SVID, then its chain (leaf + intermediate)
    bundle.pem   0644  the trust bundle (every root trusted now)

Key and chain share one file, replaced atomically, so no crash can leave a key beside another
key's certificate. A renewal makes a new key (as Istio's agent does): a key that leaked once
stops being useful at the next renewal. The old file is replaced only after the control plane
returned a valid SVID for the new key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshward.certs import files
from meshward.certs.pem import key_to_pem, load_certificates, load_private_key, public_keys_equal
from meshward.certs.verify import spiffe_id_of
from meshward.errors import UserError

SVID_FILE, BUNDLE_FILE = "svid.pem", "bundle.pem"
_CERT_MARK = b"-----BEGIN CERTIFICATE-----"


def new_key() -> ec.EllipticCurvePrivateKey:
    """ECDSA P-256: what the CA accepts in a CSR."""
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str) -> bytes:
    """PKCS#10 with exactly one URI SAN (the CA refuses anything else)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshward")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Credentials:
    """A key and its SVID chain, plus the trust bundle, as PEM."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    bundle_pem: bytes
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    serial: int

    @classmethod
    def build(cls, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes, source: str) -> Credentials:
        """Parse and check that key and leaf match; UserError (no key material) otherwise."""
        chain = load_certificates(chain_pem, f"{source} certificate chain")
        key = load_private_key(key_pem, f"{source} key")
        leaf = chain[0]
        if not public_keys_equal(key.public_key(), leaf.public_key()):
            raise UserError(f"{source}: the key does not match the certificate")
        load_certificates(bundle_pem, f"{source} trust bundle")
        return cls(
            key_pem,
            chain_pem,
            bundle_pem,
            str(spiffe_id_of(leaf)),
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            leaf.serial_number,
        )

    def with_bundle(self, bundle_pem: bytes) -> Credentials:
        from dataclasses import replace

        return replace(self, bundle_pem=bundle_pem)


class CredentialStore:
    """The agent's state directory (0700) and the credentials in it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def ensure(self) -> None:
        files.ensure_dir(self.directory)
        self.directory.chmod(files.DIR_MODE)

    def load(self) -> Credentials | None:
        """The credentials on disk, or None if there are none (first start)."""
        svid, bundle = self.directory / SVID_FILE, self.directory / BUNDLE_FILE
        if not svid.exists() or not bundle.exists():
            return None
        data = files.read_private(svid)  # refuses a group/world-readable key
        cut = data.find(_CERT_MARK)
        if cut <= 0:
            raise UserError(f"{svid} is corrupt (expected a key, then certificates)")
        return Credentials.build(data[:cut], data[cut:], files.read_bytes(bundle), str(svid))

    def save(self, credentials: Credentials) -> None:
        files.write_public(self.directory / BUNDLE_FILE, credentials.bundle_pem)
        data = credentials.key_pem.rstrip(b"\n") + b"\n" + credentials.chain_pem
        files.write_private(self.directory / SVID_FILE, data, overwrite=True)

    def save_bundle(self, bundle_pem: bytes) -> None:
        files.write_public(self.directory / BUNDLE_FILE, bundle_pem)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key_to_pem(key)
