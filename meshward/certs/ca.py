"""The CA store: generations of (root, intermediate), which one signs, and which roots are trusted.

On disk (``DIR``)::

    ca.json                  state: trust domain, active generation, per-generation trust expiry
    gen-0001/root.pem        root certificate (name-constrained to the trust domain)
    gen-0001/root.key        0600
    gen-0001/intermediate.pem
    gen-0001/intermediate.key  0600 — the key that signs SVIDs
    gen-0002/...             after `meshward ca rotate`

``ca.json`` is written last and atomically, so it is the commit point: a crash during init or
rotate leaves the previous state in force. CA rotation is state, not a process: the old
generation carries ``trusted_until`` and the bundle is computed from it at any ``now``, so a
restarted control plane drops the old root at exactly the same instant as one that never stopped.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.certs import files
from meshward.certs.bundle import TrustBundle
from meshward.certs.lifetime import Lifetime, as_utc
from meshward.certs.pem import (
    cert_to_pem,
    key_to_pem,
    load_certificate,
    load_certificates,
    load_private_key,
    new_key,
    public_keys_equal,
)
from meshward.certs.spiffe import SpiffeId, parse_spiffe_id, validate_trust_domain
from meshward.certs.x509build import (
    SKEW_BACKDATE,
    build_intermediate,
    build_root,
    build_svid,
)
from meshward.errors import UserError

DEFAULT_SVID_TTL = timedelta(hours=1)
DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = timedelta(days=5 * 365)
DEFAULT_GRACE = timedelta(hours=24)
MIN_SVID_TTL = timedelta(minutes=1)
# An SVID is a short-lived credential: renewal, not lifetime, keeps a workload running, and a
# stolen key is good until not_after. Istio's ceiling for workload certificates is 90 days
# (MAX_WORKLOAD_CERT_TTL); a longer request is a mistake (`--ttl 100000d`), not a wish.
MAX_SVID_TTL = timedelta(days=90)

STATE_FILE = "ca.json"
STATE_FORMAT = "meshward-ca/1"
ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
_GEN_DIR_RE = re.compile(r"^gen-\d{4,}$")


def check_svid_ttl(ttl: timedelta) -> None:
    """Raise UserError unless MIN_SVID_TTL <= ttl <= MAX_SVID_TTL (said in the flags' units)."""
    from meshward.certs.duration import format_duration

    if ttl < MIN_SVID_TTL:
        raise UserError(
            f"SVID TTL must be at least {format_duration(MIN_SVID_TTL)}, got "
            f"{format_duration(ttl)}; nothing was issued"
        )
    if ttl > MAX_SVID_TTL:
        raise UserError(
            f"SVID TTL must be at most {format_duration(MAX_SVID_TTL)} (SVIDs are short-lived and "
            f"renewed), got {format_duration(ttl)}; nothing was issued"
        )


@dataclass(frozen=True)
class Svid:
    """An X.509 SVID. ``private_key_pem`` is empty when the workload sent a CSR."""

    spiffe_id: str
    cert_chain_pem: bytes  # leaf + intermediate
    private_key_pem: bytes = field(repr=False)  # never in logs via repr()
    not_before: datetime
    not_after: datetime
    serial: int

    @property
    def lifetime(self) -> Lifetime:
        return Lifetime(self.not_before, self.not_after)

    def chain(self) -> list[x509.Certificate]:
        return load_certificates(self.cert_chain_pem, f"SVID chain for {self.spiffe_id}")

    def certificate(self) -> x509.Certificate:
        return self.chain()[0]


@dataclass(frozen=True)
class CaGeneration:
    """One root + intermediate pair. The newest is active (signs); older ones are only trusted."""

    number: int
    root: x509.Certificate
    intermediate: x509.Certificate
    created_at: datetime
    trusted_until: datetime | None  # None: trusted until the root expires

    def trusted(self, now: datetime) -> bool:
        now = as_utc(now)
        if now > self.root.not_valid_after_utc:
            return False
        return self.trusted_until is None or now < self.trusted_until

    @property
    def root_fingerprint(self) -> str:
        return self.root.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class _Gen:
    info: CaGeneration
    root_key: ec.EllipticCurvePrivateKey
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate_pem: bytes
    aki: x509.AuthorityKeyIdentifier


def _gen(
    info: CaGeneration, root_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey
) -> _Gen:
    return _Gen(
        info,
        root_key,
        key,
        cert_to_pem(info.intermediate),
        x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
    )


def _positive(what: str, value: timedelta) -> None:
    if value <= timedelta(0):
        raise UserError(f"{what} must be positive, got {value}")


def _new_generation(
    trust_domain: str,
    number: int,
    *,
    now: datetime,
    root_ttl: timedelta,
    intermediate_ttl: timedelta,
) -> _Gen:
    _positive("root TTL", root_ttl)
    _positive("intermediate TTL", intermediate_ttl)
    not_before = now - SKEW_BACKDATE
    root_key, int_key = new_key(), new_key()
    root = build_root(
        root_key, trust_domain, number, not_before=not_before, not_after=now + root_ttl
    )
    intermediate = build_intermediate(
        int_key,
        root,
        root_key,
        trust_domain,
        number,
        not_before=not_before,
        not_after=min(now + intermediate_ttl, root.not_valid_after_utc),
    )
    info = CaGeneration(number, root, intermediate, now, None)
    return _gen(info, root_key, int_key)


class CertificateAuthority:
    """Issues SVIDs for one trust domain and knows which roots are trusted at any instant.

    Use ``init`` / ``load`` for a CA stored on disk, ``ephemeral`` for one that lives in memory
    (tests, benchmarks, throwaway demos).
    """

    def __init__(
        self, trust_domain: str, generations: Sequence[_Gen], directory: Path | None
    ) -> None:
        if not generations:
            raise UserError("a CA needs at least one generation")
        self.trust_domain = trust_domain
        self._directory = directory
        self._gens: tuple[_Gen, ...] = tuple(sorted(generations, key=lambda g: g.info.number))
        self._active = self._gens[-1]

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        trust_domain: str,
        *,
        force: bool = False,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        validate_trust_domain(trust_domain)
        directory = Path(directory)
        state = directory / STATE_FILE
        if state.exists() and not force:
            raise UserError(
                f"{directory} already holds a Meshward CA ({state}); pass --force to replace it "
                "(every identity it issued stops being trusted)"
            )
        gen = _new_generation(
            trust_domain,
            1,
            now=as_utc(now),
            root_ttl=root_ttl,
            intermediate_ttl=intermediate_ttl,
        )
        files.ensure_dir(directory)
        if force:
            for path in _generation_dirs(directory):
                shutil.rmtree(path)
        ca = cls(trust_domain, [gen], directory)
        ca._write_generation(gen, overwrite=force)
        ca._write_state()
        return ca

    @classmethod
    def ephemeral(
        cls,
        trust_domain: str,
        *,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        validate_trust_domain(trust_domain)
        gen = _new_generation(
            trust_domain, 1, now=as_utc(now), root_ttl=root_ttl, intermediate_ttl=intermediate_ttl
        )
        return cls(trust_domain, [gen], None)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        directory = Path(directory)
        state_path = directory / STATE_FILE
        if not state_path.exists():
            raise UserError(
                f"no Meshward CA in {directory} ({STATE_FILE} missing): create one with "
                f"`meshward ca init --dir {directory} --trust-domain <td>`"
            )
        state = _parse_state(files.read_bytes(state_path), state_path)
        trust_domain = state["trust_domain"]
        gens = [_load_generation(directory, trust_domain, entry) for entry in state["generations"]]
        ca = cls(trust_domain, gens, directory)
        if ca._active.info.number != state["active"]:
            raise UserError(f"{state_path}: active generation must be the newest one")
        return ca

    # ---- views --------------------------------------------------------------------------------

    @property
    def directory(self) -> Path | None:
        return self._directory

    @property
    def generations(self) -> tuple[CaGeneration, ...]:
        return tuple(g.info for g in self._gens)

    @property
    def active_generation(self) -> CaGeneration:
        return self._active.info

    def trust_bundle(self, now: datetime | None = None) -> TrustBundle:
        """Every root trusted at ``now`` (default: the current time), oldest first."""
        at = as_utc(now)
        return TrustBundle.from_certificates(
            self.trust_domain, [g.info.root for g in self._gens if g.info.trusted(at)]
        )

    def oldest_trusted_generation(self, now: datetime | None = None) -> CaGeneration:
        """The oldest generation that is trusted at ``now`` and can sign (its intermediate is
        valid); the active one when no other qualifies.

        During a rotation's grace period a certificate it signs verifies against every bundle
        handed out since that generation was introduced, including bundles written before the
        rotation: what a server presents to clients that may hold an old bundle (the ADS
        server to sidecars' bootstrap credentials).
        """
        at = as_utc(now)
        for gen in self._gens:
            intermediate = gen.info.intermediate
            if (
                gen.info.trusted(at)
                and intermediate.not_valid_before_utc <= at < intermediate.not_valid_after_utc
            ):
                return gen.info
        return self._active.info

    def issuing_generation(self, certificate: x509.Certificate) -> CaGeneration | None:
        """The generation whose intermediate signed ``certificate`` (matched by key identifier,
        not verified: use on certificates TLS already verified), or None if none of the
        generations this CA still holds did."""
        try:
            aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
        except (x509.ExtensionNotFound, ValueError):
            return None
        for gen in self._gens:
            if aki.value.key_identifier == gen.aki.key_identifier:
                return gen.info
        return None

    # ---- issuance -----------------------------------------------------------------------------

    def issue(
        self,
        spiffe_id: str | SpiffeId,
        *,
        ttl: timedelta = DEFAULT_SVID_TTL,
        now: datetime | None = None,
        generation: int | None = None,
    ) -> Svid:
        """A fresh key pair and its SVID. The key never touches disk here.

        ``generation``: sign with that (trusted) generation instead of the active one, e.g.
        :meth:`oldest_trusted_generation` for a server whose clients may hold an old bundle.
        """
        identity = self._identity(spiffe_id)
        key = new_key()
        cert, gen = self._sign(key.public_key(), identity, ttl, now, generation)
        return self._svid(identity, cert, gen, key_to_pem(key))

    def issue_for_csr(
        self,
        csr_pem: bytes,
        spiffe_id: str | SpiffeId,
        *,
        ttl: timedelta = DEFAULT_SVID_TTL,
        now: datetime | None = None,
    ) -> Svid:
        """Sign a workload's CSR after checking it proves its key and asks for ``spiffe_id``.

        The identity is decided by the caller (who authenticated the workload), never by the CSR;
        the CSR must merely agree, so a workload cannot talk us into a different identity.
        """
        identity = self._identity(spiffe_id)
        csr = _parse_csr(csr_pem)
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
            public.curve, ec.SECP256R1
        ):
            raise UserError("CSR key must be ECDSA P-256; generate the workload key on that curve")
        if not csr.is_signature_valid:
            raise UserError(
                "CSR signature does not verify: it was not signed by the key it carries; "
                "nothing was issued"
            )
        requested = _requested_uris(csr)
        if requested != [str(identity)]:
            asked = ", ".join(requested) if requested else "no URI SAN"
            raise UserError(
                f"CSR asks for {asked}, but this request is for {identity}; the CSR must carry "
                "exactly that one URI SAN (nothing was issued)"
            )
        cert, gen = self._sign(public, identity, ttl, now)
        return self._svid(identity, cert, gen, b"")

    def _identity(self, spiffe_id: str | SpiffeId) -> SpiffeId:
        if isinstance(spiffe_id, SpiffeId):
            spiffe_id = str(spiffe_id)
        return parse_spiffe_id(spiffe_id, self.trust_domain)

    def _sign(
        self,
        public: ec.EllipticCurvePublicKey,
        identity: SpiffeId,
        ttl: timedelta,
        now: datetime | None,
        generation: int | None = None,
    ) -> tuple[x509.Certificate, _Gen]:
        check_svid_ttl(ttl)
        at = as_utc(now)
        gen = self._active
        if generation is not None and generation != gen.info.number:
            gen = next((g for g in self._gens if g.info.number == generation), gen)
            if gen is self._active or not gen.info.trusted(at):
                raise UserError(
                    f"CA generation {generation} is not trusted (any more); nothing was issued"
                )
        self._check_signing_window(gen, at)
        intermediate = gen.info.intermediate
        not_before = max(at - SKEW_BACKDATE, intermediate.not_valid_before_utc)
        # An SVID never outlives the CA that signed it; the schedule renews from its real end.
        not_after = min(at + ttl, intermediate.not_valid_after_utc)
        cert = build_svid(
            public,
            str(identity),
            intermediate,
            gen.intermediate_key,
            gen.aki,
            not_before=not_before,
            not_after=not_after,
        )
        return cert, gen

    def _check_signing_window(self, gen: _Gen, at: datetime) -> None:
        where = f" in {self._directory}" if self._directory else ""
        for kind, cert in (("root", gen.info.root), ("intermediate", gen.info.intermediate)):
            if at < cert.not_valid_before_utc:
                raise UserError(
                    f"CA {kind}{where} is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%SZ} "
                    "(clock skew?); nothing was issued"
                )
            if at >= cert.not_valid_after_utc:
                raise UserError(
                    f"CA {kind}{where} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}; "
                    f"run `meshward ca rotate --dir {self._directory or '<dir>'}`; nothing was issued"
                )

    @staticmethod
    def _svid(identity: SpiffeId, cert: x509.Certificate, gen: _Gen, key_pem: bytes) -> Svid:
        return Svid(
            spiffe_id=str(identity),
            cert_chain_pem=cert_to_pem(cert) + gen.intermediate_pem,
            private_key_pem=key_pem,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
        )

    # ---- CA rotation --------------------------------------------------------------------------

    def rotate(
        self,
        *,
        grace: timedelta = DEFAULT_GRACE,
        root_ttl: timedelta = DEFAULT_ROOT_TTL,
        intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
        now: datetime | None = None,
    ) -> CaGeneration:
        """Introduce a new root+intermediate that signs from now on; older roots stay trusted
        for ``grace`` and are then dropped from the bundle.

        ``grace`` must outlast the longest SVID TTL, so every workload holds a new-root SVID
        before anyone stops trusting the old root.
        """
        if grace < timedelta(0):
            raise UserError(f"grace period must not be negative, got {grace}")
        at = as_utc(now)
        self.prune(now=at)
        gen = _new_generation(
            self.trust_domain,
            self._active.info.number + 1,
            now=at,
            root_ttl=root_ttl,
            intermediate_ttl=intermediate_ttl,
        )
        until = at + grace
        older = tuple(
            g
            if g.info.trusted_until is not None
            else replace(g, info=replace(g.info, trusted_until=until))
            for g in self._gens
        )
        if self._directory is not None:
            self._write_generation(gen, overwrite=False)
        self._gens = (*older, gen)
        self._active = gen
        self._write_state()
        return gen.info

    def prune(self, now: datetime | None = None) -> list[int]:
        """Forget generations whose grace period is over (and delete their keys); returns them."""
        at = as_utc(now)
        dropped = [g for g in self._gens if g is not self._active and not g.info.trusted(at)]
        if not dropped:
            return []
        gone = {g.info.number for g in dropped}
        self._gens = tuple(g for g in self._gens if g.info.number not in gone)
        self._write_state()
        if self._directory is not None:
            for g in dropped:
                shutil.rmtree(self._directory / _gen_dir_name(g.info.number), ignore_errors=True)
        return [g.info.number for g in dropped]

    # ---- persistence --------------------------------------------------------------------------

    def _write_generation(self, gen: _Gen, *, overwrite: bool) -> None:
        assert self._directory is not None
        gdir = self._directory / _gen_dir_name(gen.info.number)
        files.ensure_dir(gdir)
        files.write_private(gdir / ROOT_KEY, key_to_pem(gen.root_key), overwrite=overwrite)
        files.write_private(
            gdir / INTERMEDIATE_KEY, key_to_pem(gen.intermediate_key), overwrite=overwrite
        )
        files.write_public(gdir / ROOT_CERT, cert_to_pem(gen.info.root), overwrite=overwrite)
        files.write_public(gdir / INTERMEDIATE_CERT, gen.intermediate_pem, overwrite=overwrite)

    def _write_state(self) -> None:
        if self._directory is None:
            return
        state = {
            "format": STATE_FORMAT,
            "trust_domain": self.trust_domain,
            "active": self._active.info.number,
            "generations": [
                {
                    "number": g.info.number,
                    "created_at": g.info.created_at.isoformat(),
                    "trusted_until": (
                        g.info.trusted_until.isoformat() if g.info.trusted_until else None
                    ),
                }
                for g in self._gens
            ],
        }
        data = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
        files.write_public(self._directory / STATE_FILE, data, overwrite=True)


def _gen_dir_name(number: int) -> str:
    return f"gen-{number:04d}"


def _generation_dirs(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_dir() and _GEN_DIR_RE.match(p.name)]


def _parse_state(data: bytes, path: Path) -> dict[str, Any]:
    bad = f"{path} is corrupt"
    try:
        state = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{bad} (not JSON); restore it from a backup or re-create the CA") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{bad}: expected format {STATE_FORMAT!r}")
    try:
        validate_trust_domain(state.get("trust_domain", ""))
    except UserError as exc:
        raise UserError(f"{bad}: {exc}") from None
    gens = state.get("generations")
    if not isinstance(gens, list) or not gens:
        raise UserError(f"{bad}: no generations listed")
    for entry in gens:
        try:
            entry["number"] = int(entry["number"])
            entry["created_at"] = as_utc(datetime.fromisoformat(entry["created_at"]))
            until = entry.get("trusted_until")
            entry["trusted_until"] = as_utc(datetime.fromisoformat(until)) if until else None
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{bad}: malformed generation entry {entry!r}") from None
    if not isinstance(state.get("active"), int):
        raise UserError(f"{bad}: no active generation")
    return state


def _load_generation(directory: Path, trust_domain: str, entry: dict[str, Any]) -> _Gen:
    gdir = directory / _gen_dir_name(entry["number"])
    root_key = load_private_key(files.read_private(gdir / ROOT_KEY), str(gdir / ROOT_KEY))
    int_key = load_private_key(
        files.read_private(gdir / INTERMEDIATE_KEY), str(gdir / INTERMEDIATE_KEY)
    )
    root = load_certificate(files.read_bytes(gdir / ROOT_CERT), str(gdir / ROOT_CERT))
    intermediate = load_certificate(
        files.read_bytes(gdir / INTERMEDIATE_CERT), str(gdir / INTERMEDIATE_CERT)
    )
    if not public_keys_equal(root_key.public_key(), root.public_key()):
        raise UserError(f"{gdir / ROOT_KEY} does not match {gdir / ROOT_CERT}")
    if not public_keys_equal(int_key.public_key(), intermediate.public_key()):
        raise UserError(f"{gdir / INTERMEDIATE_KEY} does not match {gdir / INTERMEDIATE_CERT}")
    try:
        intermediate.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise UserError(
            f"{gdir / INTERMEDIATE_CERT} was not issued by {gdir / ROOT_CERT}"
        ) from None
    info = CaGeneration(
        entry["number"], root, intermediate, entry["created_at"], entry["trusted_until"]
    )
    return _gen(info, root_key, int_key)


def _parse_csr(data: bytes) -> x509.CertificateSigningRequest:
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise UserError("CSR is not PEM (-----BEGIN CERTIFICATE REQUEST-----); nothing was issued")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError:
        raise UserError("CSR is corrupt (truncated or edited PEM); nothing was issued") from None


def _requested_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError:
        raise UserError("CSR extensions are malformed; nothing was issued") from None
    names = list(san)
    uris = [n.value for n in names if isinstance(n, x509.UniformResourceIdentifier)]
    if len(uris) != len(names):
        raise UserError(
            "CSR asks for non-URI subject alternative names (DNS/IP/email); an SVID carries "
            "exactly one spiffe:// URI; nothing was issued"
        )
    return uris
