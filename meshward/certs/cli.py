"""`meshward ca ...`: create the CA, issue and inspect SVIDs, rotate roots.

cryptography is imported inside handlers so `meshward --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from meshward.certs.duration import format_duration
from meshward.cliutil import add_json_flag, duration, print_json
from meshward.errors import UserError

DEFAULT_DIR_ENV = "MESHWARD_CA_DIR"
DEFAULT_DIR = "certs/ca"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# Istio's file names, so tools that read Istio's output directory read ours.
CHAIN_FILE, KEY_FILE, ROOTS_FILE = "cert-chain.pem", "key.pem", "root-cert.pem"


def _add_dir(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get(DEFAULT_DIR_ENV, DEFAULT_DIR)
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(default),
        metavar="DIR",
        help=f"CA store directory (default: ${DEFAULT_DIR_ENV} or {DEFAULT_DIR}; now {default})",
    )


def _add_ca_ttls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root-ttl",
        type=duration,
        default=None,
        metavar="DURATION",
        help="root certificate lifetime (default: 3650d)",
    )
    parser.add_argument(
        "--intermediate-ttl",
        type=duration,
        default=None,
        metavar="DURATION",
        help="intermediate (signing) certificate lifetime, capped at the root's (default: 1825d)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser.formatter_class = raw
    parser.epilog = (
        "workflow:\n"
        "  meshward ca init --dir certs/ca --trust-domain cluster.local\n"
        "  meshward ca issue --dir certs/ca --spiffe-id spiffe://cluster.local/ns/shop/sa/orders "
        "--out /tmp/orders\n"
        "  meshward ca inspect /tmp/orders/cert-chain.pem --bundle /tmp/orders/root-cert.pem\n"
        "  meshward ca rotate --dir certs/ca --grace 24h   # new root; old one trusted 24h more\n"
        "  meshward ca join-token --dir certs/ca --workload shop/orders --ttl 10m  # for an agent\n"
        f"init, issue, rotate and show take --dir (default ${DEFAULT_DIR_ENV} or {DEFAULT_DIR})."
    )
    sub = parser.add_subparsers(dest="ca_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser(
        "init",
        help="create a CA: a name-constrained root and an intermediate that signs SVIDs",
        formatter_class=raw,
        description=(
            "Create a CA store: an ECDSA P-256 root whose name constraints permit only URI\n"
            "names under the trust domain (no DNS names, no IP addresses), and an intermediate\n"
            "that signs workload SVIDs. Keys are written 0600, atomically, and never overwritten\n"
            "without --force."
        ),
        epilog=(
            "examples:\n"
            "  meshward ca init --dir certs/ca --trust-domain cluster.local\n"
            "  meshward ca init --dir /tmp/ca --trust-domain example.org --root-ttl 365d --force"
        ),
    )
    _add_dir(p)
    p.add_argument(
        "--trust-domain",
        default=DEFAULT_TRUST_DOMAIN,
        metavar="TD",
        help=f"SPIFFE trust domain, lowercase (default: {DEFAULT_TRUST_DOMAIN})",
    )
    p.add_argument("--force", action="store_true", help="replace an existing CA and its keys")
    _add_ca_ttls(p)
    add_json_flag(p)
    p.set_defaults(func=_init)

    p = sub.add_parser(
        "issue",
        help="issue an SVID (cert chain, key 0600, trust bundle) into a directory",
        formatter_class=raw,
        description=(
            "Issue an X.509 SVID for one SPIFFE ID and write it with Istio's file names:\n"
            f"  {CHAIN_FILE}  leaf + intermediate\n"
            f"  {KEY_FILE}         the private key (0600; not written with --csr)\n"
            f"  {ROOTS_FILE}   every root trusted now (the trust bundle)\n"
            "With --csr the workload keeps its key: the CSR must be signed by the key it carries\n"
            "and ask for exactly the --spiffe-id being issued."
        ),
        epilog=(
            "examples:\n"
            "  meshward ca issue --spiffe-id spiffe://cluster.local/ns/shop/sa/frontend --out /tmp/fe\n"
            "  meshward ca issue --spiffe-id spiffe://cluster.local/ns/shop/sa/orders --ttl 15m "
            "--out /tmp/orders\n"
            "  meshward ca issue --spiffe-id spiffe://cluster.local/ns/shop/sa/payments --csr payments.csr "
            "--out /tmp/payments"
        ),
    )
    _add_dir(p)
    p.add_argument("--spiffe-id", required=True, metavar="ID", help="spiffe://TD/ns/NS/sa/SA")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    p.add_argument(
        "--ttl",
        type=duration,
        default=None,
        metavar="DURATION",
        help="SVID lifetime, e.g. 30m, 1h, 24h (default: 1h; 1m to 90d, and never past the "
        "signing intermediate's end)",
    )
    p.add_argument(
        "--csr", type=Path, metavar="FILE", help="sign this PEM CSR instead of making a key"
    )
    p.add_argument("--force", action="store_true", help="overwrite existing files in --out")
    add_json_flag(p)
    p.set_defaults(func=_issue)

    p = sub.add_parser(
        "inspect",
        help="show identity, issuer, validity and remaining lifetime of certificates",
        formatter_class=raw,
        description=(
            "Describe every certificate in a PEM file (an SVID chain, a trust bundle, a root):\n"
            "SPIFFE identity, subject, issuer, validity window and remaining lifetime.\n"
            "With --bundle, also verify the chain against that trust bundle."
        ),
        epilog=(
            "examples:\n"
            f"  meshward ca inspect /tmp/fe/{CHAIN_FILE}\n"
            f"  meshward ca inspect /tmp/fe/{CHAIN_FILE} --bundle /tmp/fe/{ROOTS_FILE} --json"
        ),
    )
    p.add_argument("file", type=Path, metavar="FILE", help="PEM file with one or more certificates")
    p.add_argument(
        "--bundle", type=Path, metavar="FILE", help="verify FILE's chain against these roots"
    )
    add_json_flag(p)
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "rotate",
        help="introduce a new root; the old one stays trusted for a grace period",
        formatter_class=raw,
        description=(
            "Rotate the CA: create a new root + intermediate that sign from now on, and keep\n"
            "every older root in the trust bundle until the grace period ends; then it is\n"
            "dropped (and its keys deleted at the next rotate). The schedule is stored in the\n"
            "CA directory, so it survives restarts. Pick a grace period longer than the\n"
            "longest SVID TTL, so every workload is re-issued by the new root in time.\n"
            "\n"
            "Sidecars: the control plane (`meshward xds serve`) picks the rotation up by itself.\n"
            "Each `meshward agent` fetches the new bundle and renews onto the new root by itself.\n"
            "An Envoy you run with `meshward bootstrap` files trusts only the roots of its last\n"
            "join or renewal: run `meshward bootstrap --renew` for it WITHIN THE GRACE PERIOD\n"
            "(new bundle and new-root SVID; Envoy watches the directory and reloads them live).\n"
            "Until the old root is dropped, the control\n"
            "plane presents an ADS certificate from the old root and accepts client\n"
            "certificates of every trusted root, so sidecars not yet refreshed keep\n"
            "(re)connecting; after it, they cannot. `meshward status` lists the sidecars\n"
            "still on an old root (ADS CREDS: RETIRING)."
        ),
        epilog=(
            "examples:\n  meshward ca rotate --dir certs/ca\n"
            "  meshward ca rotate --dir certs/ca --grace 2h\n"
            "then, for every sidecar, before the grace period ends:\n"
            "  meshward bootstrap --renew --workload NS/NAME --xds HOST:PORT --out DIR\n"
            "  meshward status --xds HOST:ADMIN_PORT        # ADS CREDS: ok everywhere"
        ),
    )
    _add_dir(p)
    p.add_argument(
        "--grace",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how long older roots stay trusted (default: 24h; 0 drops them now)",
    )
    _add_ca_ttls(p)
    add_json_flag(p)
    p.set_defaults(func=_rotate)

    p = sub.add_parser(
        "show",
        help="list CA generations, the active signer and the roots trusted now",
        description="Show the CA store: trust domain, generations, which roots are trusted now.",
        epilog="example:\n  meshward ca show --dir certs/ca --json",
        formatter_class=raw,
    )
    _add_dir(p)
    add_json_flag(p)
    p.set_defaults(func=_show)

    from meshward.certs import join_cli

    join_cli.configure(sub, _add_dir)


# ---- handlers -------------------------------------------------------------------------------


def _ttl_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.root_ttl is not None:
        out["root_ttl"] = args.root_ttl
    if args.intermediate_ttl is not None:
        out["intermediate_ttl"] = args.intermediate_ttl
    return out


def _generation_dict(gen: Any, active: int, now: Any) -> dict[str, Any]:
    return {
        "number": gen.number,
        "active": gen.number == active,
        "trusted": gen.trusted(now),
        "trusted_until": gen.trusted_until.isoformat() if gen.trusted_until else None,
        "root_sha256": gen.root_fingerprint,
        "root_not_after": gen.root.not_valid_after_utc.isoformat(),
        "intermediate_not_after": gen.intermediate.not_valid_after_utc.isoformat(),
    }


def _init(args: argparse.Namespace) -> int:
    from meshward.certs.ca import CertificateAuthority
    from meshward.certs.lifetime import utcnow

    ca = CertificateAuthority.init(
        args.dir, args.trust_domain, force=args.force, **_ttl_kwargs(args)
    )
    gen = ca.active_generation
    if args.json:
        print_json(
            {
                "dir": str(args.dir),
                "trust_domain": ca.trust_domain,
                "generation": _generation_dict(gen, gen.number, utcnow()),
            }
        )
        return 0
    print(f"created CA for trust domain {ca.trust_domain} in {args.dir}")
    print(f"  root sha256:  {gen.root_fingerprint}")
    print(f"  root valid until:         {gen.root.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    print(f"  intermediate valid until: {gen.intermediate.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}")
    print(
        f"next: meshward ca issue --dir {args.dir} --spiffe-id spiffe://{ca.trust_domain}/ns/<ns>/sa/<sa> --out <dir>"
    )
    return 0


def _issue(args: argparse.Namespace) -> int:
    from meshward.certs import files
    from meshward.certs.ca import DEFAULT_SVID_TTL, CertificateAuthority, check_svid_ttl
    from meshward.certs.lifetime import utcnow

    ca = CertificateAuthority.load(args.dir)
    ttl = args.ttl if args.ttl is not None else DEFAULT_SVID_TTL
    now = utcnow()
    check_svid_ttl(ttl)
    signer_ends = ca.active_generation.intermediate.not_valid_after_utc
    if now < signer_ends < now + ttl:  # (an expired signer: the CA says so itself)
        raise UserError(
            f"--ttl {format_duration(ttl)} outlives the signing intermediate (valid until "
            f"{signer_ends:%Y-%m-%d %H:%M:%SZ}, {format_duration(signer_ends - now)} from now); "
            "ask for less, or `meshward ca rotate` first; nothing was issued"
        )
    if args.csr is not None:
        svid = ca.issue_for_csr(files.read_bytes(args.csr), args.spiffe_id, ttl=ttl, now=now)
    else:
        svid = ca.issue(args.spiffe_id, ttl=ttl, now=now)
    bundle = ca.trust_bundle(now=now)
    out: Path = args.out
    files.ensure_dir(out)
    targets = [out / CHAIN_FILE, out / ROOTS_FILE] + (
        [out / KEY_FILE] if svid.private_key_pem else []
    )
    if not args.force:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            raise UserError(f"{', '.join(existing)} already exist(s); pass --force to overwrite")
    if svid.private_key_pem:
        files.write_private(out / KEY_FILE, svid.private_key_pem, overwrite=args.force)
    files.write_public(out / CHAIN_FILE, svid.cert_chain_pem, overwrite=args.force)
    files.write_public(out / ROOTS_FILE, bundle.roots_pem, overwrite=args.force)
    written = {"cert_chain": str(out / CHAIN_FILE), "trust_bundle": str(out / ROOTS_FILE)}
    if svid.private_key_pem:
        written["private_key"] = str(out / KEY_FILE)
    if args.json:
        print_json(
            {
                "spiffe_id": svid.spiffe_id,
                "serial": f"{svid.serial:x}",
                "not_before": svid.not_before.isoformat(),
                "not_after": svid.not_after.isoformat(),
                "files": written,
                "roots": len(bundle),
            }
        )
        return 0
    print(f"issued {svid.spiffe_id}")
    print(
        f"  valid {svid.not_before:%Y-%m-%d %H:%M:%SZ} .. {svid.not_after:%Y-%m-%d %H:%M:%SZ} "
        f"({format_duration(svid.not_after - now)} left)"
    )
    for label, path in written.items():
        print(f"  {label + ':':14} {path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from meshward.certs import files
    from meshward.certs.bundle import TrustBundle
    from meshward.certs.inspect import describe_all
    from meshward.certs.lifetime import utcnow
    from meshward.certs.pem import load_certificates
    from meshward.certs.verify import spiffe_id_of, verify_svid

    now = utcnow()
    certs = load_certificates(files.read_bytes(args.file), str(args.file))
    infos = describe_all(certs, now)
    verified: str | None = None
    if args.bundle is not None:
        roots = load_certificates(files.read_bytes(args.bundle), str(args.bundle))
        trust_domain = spiffe_id_of(certs[0]).trust_domain
        bundle = TrustBundle.from_certificates(trust_domain, roots)
        verified = str(verify_svid(certs, bundle, now=now))
    if args.json:
        payload: dict[str, Any] = {
            "file": str(args.file),
            "certificates": [i.as_dict() for i in infos],
        }
        if args.bundle is not None:
            payload["verified"] = {"bundle": str(args.bundle), "spiffe_id": verified}
        print_json(payload)
        return 0
    for info in infos:
        kind = "CA certificate" if info.is_ca else "certificate"
        print(f"{args.file} [{info.position + 1}/{len(infos)}] {kind}")
        if info.identity:
            print(f"  identity:  {info.identity}")
        print(f"  subject:   {info.subject}")
        print(f"  issuer:    {info.issuer}")
        print(
            f"  valid:     {info.not_before:%Y-%m-%d %H:%M:%SZ} .. {info.not_after:%Y-%m-%d %H:%M:%SZ}"
        )
        print(f"  remaining: {info.remaining_text()}")
        if info.sans and not info.identity:
            print(f"  SANs:      {', '.join(info.sans)}")
        print(f"  key:       {info.key}   serial: {info.serial}")
        print(f"  sha256:    {info.sha256}")
    if verified is not None:
        print(f"verified: {verified} chains to {args.bundle}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    from meshward.certs.ca import DEFAULT_GRACE, CertificateAuthority
    from meshward.certs.lifetime import utcnow

    ca = CertificateAuthority.load(args.dir)
    now = utcnow()
    grace = args.grace if args.grace is not None else DEFAULT_GRACE
    gen = ca.rotate(grace=grace, now=now, **_ttl_kwargs(args))
    others = [g for g in ca.generations if g.number != gen.number]
    if args.json:
        print_json(
            {
                "dir": str(args.dir),
                "active": gen.number,
                "generations": [_generation_dict(g, gen.number, now) for g in ca.generations],
            }
        )
        return 0
    print(f"rotated CA in {args.dir}: generation {gen.number} signs from now on")
    print(f"  new root sha256: {gen.root_fingerprint}")
    for g in others:
        until = g.trusted_until
        when = (
            f"until {until:%Y-%m-%d %H:%M:%SZ}" if until and until > now else "no longer (dropped)"
        )
        print(f"  generation {g.number} root {g.root_fingerprint[:16]}… trusted {when}")
    print("push the new trust bundle to every workload before re-issuing their SVIDs")
    dropped_at = min((g.trusted_until for g in others if g.trusted_until), default=None)
    if dropped_at is not None and dropped_at > now:
        deadline = f"before {dropped_at:%Y-%m-%d %H:%M:%SZ}"
        print(
            f"sidecars: agents renew onto the new root by themselves; run `meshward bootstrap "
            f"--renew` for each Envoy you run yourself {deadline} (its files trust only the old "
            "root); `meshward status` lists those still on it"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    from meshward.certs.ca import CertificateAuthority
    from meshward.certs.lifetime import utcnow

    ca = CertificateAuthority.load(args.dir)
    now = utcnow()
    active = ca.active_generation.number
    gens = [_generation_dict(g, active, now) for g in ca.generations]
    if args.json:
        print_json(
            {
                "dir": str(args.dir),
                "trust_domain": ca.trust_domain,
                "active": active,
                "generations": gens,
                "bundle_sha256": ca.trust_bundle(now).fingerprints(),
            }
        )
        return 0
    print(f"CA {args.dir}: trust domain {ca.trust_domain}")
    for g in ca.generations:
        tags = ["active" if g.number == active else "", "trusted" if g.trusted(now) else "dropped"]
        until = f", until {g.trusted_until:%Y-%m-%d %H:%M:%SZ}" if g.trusted_until else ""
        print(f"  generation {g.number} [{', '.join(t for t in tags if t)}{until}]")
        print(f"    root sha256 {g.root_fingerprint}")
        print(
            f"    root valid until {g.root.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}, intermediate until "
            f"{g.intermediate.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}"
        )
    print(f"  roots trusted now: {len(ca.trust_bundle(now))}")
    sys.stdout.flush()
    return 0
