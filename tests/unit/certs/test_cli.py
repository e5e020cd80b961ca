"""`meshward ca init|issue|inspect|rotate|show`, run in-process through the real entry point."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.certs.bundle import TrustBundle
from meshward.certs.ca import CertificateAuthority
from meshward.certs.pem import load_certificates, load_private_key, public_keys_equal
from meshward.certs.verify import verify_svid
from meshward.cli import main

TD = "cluster.local"
FRONTEND = f"spiffe://{TD}/ns/shop/sa/frontend"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["ca", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, out, _ = run(capsys, "init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD)
    assert code == 0 and "root sha256" in out
    return tmp_path / "ca"


def test_issue_writes_chain_key_0600_and_bundle(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "fe"
    code, out, _ = run(
        capsys,
        "issue",
        "--dir",
        str(store),
        "--spiffe-id",
        FRONTEND,
        "--out",
        str(out_dir),
        "--ttl",
        "15m",
        "--json",
    )
    assert code == 0
    report = json.loads(out)
    assert report["spiffe_id"] == FRONTEND and report["roots"] == 1
    key_path = out_dir / "key.pem"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    chain = load_certificates((out_dir / "cert-chain.pem").read_bytes(), "chain")
    assert len(chain) == 2
    key = load_private_key(key_path.read_bytes(), "key")
    assert public_keys_equal(key.public_key(), chain[0].public_key())
    bundle = TrustBundle(TD, (out_dir / "root-cert.pem").read_bytes())
    assert str(verify_svid(chain, bundle)) == FRONTEND
    lifetime = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 15 * 60 <= lifetime.total_seconds() <= 17 * 60
    # re-issuing into the same directory needs --force
    again = ["issue", "--dir", str(store), "--spiffe-id", FRONTEND, "--out", str(out_dir)]
    code, _, err = run(capsys, *again)
    assert code == 1 and "--force" in err
    assert run(capsys, *again, "--force")[0] == 0


def test_issue_from_csr(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(FRONTEND)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "fe.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out_dir = tmp_path / "csr-out"
    code, out, _ = run(
        capsys,
        "issue",
        "--dir",
        str(store),
        "--spiffe-id",
        FRONTEND,
        "--csr",
        str(tmp_path / "fe.csr"),
        "--out",
        str(out_dir),
    )
    assert code == 0 and "private_key" not in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["cert-chain.pem", "root-cert.pem"]
    code, _, err = run(
        capsys,
        "issue",
        "--dir",
        str(store),
        "--spiffe-id",
        f"spiffe://{TD}/ns/shop/sa/admin",
        "--csr",
        str(tmp_path / "fe.csr"),
        "--out",
        str(tmp_path / "nope"),
    )
    assert code == 1 and "CSR asks for" in err
    assert not (tmp_path / "nope").exists()


def test_inspect_text_and_json(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "fe"
    run(capsys, "issue", "--dir", str(store), "--spiffe-id", FRONTEND, "--out", str(out_dir))
    chain, roots = str(out_dir / "cert-chain.pem"), str(out_dir / "root-cert.pem")
    code, out, _ = run(capsys, "inspect", chain)
    assert code == 0
    assert f"identity:  {FRONTEND}" in out and "issuer:    CN=meshward intermediate" in out
    assert "remaining: 59m" in out or "remaining: 1h" in out
    code, out, _ = run(capsys, "inspect", chain, "--bundle", roots, "--json")
    assert code == 0
    report = json.loads(out)
    leaf, inter = report["certificates"]
    assert leaf["identity"] == FRONTEND and not leaf["is_ca"] and inter["is_ca"]
    assert 3500 < leaf["remaining_seconds"] <= 3600 and leaf["validity"] == "valid"
    assert report["verified"]["spiffe_id"] == FRONTEND
    # verifying against a stranger's bundle fails with one line
    other = CertificateAuthority.ephemeral(TD).trust_bundle()
    (tmp_path / "other.pem").write_bytes(other.roots_pem)
    code, _, err = run(capsys, "inspect", chain, "--bundle", str(tmp_path / "other.pem"))
    assert code == 1 and "not in the trust bundle" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "corrupt PEM"),
        (b"hello", "no PEM certificate"),
        (b"-----BEGIN PRIVATE KEY-----\n", "private key, not a certificate"),
    ],
)
def test_inspect_bad_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, fragment: str
) -> None:
    path = tmp_path / "x.pem"
    path.write_bytes(content)
    code, out, err = run(capsys, "inspect", str(path))
    assert code == 1 and fragment in err and out == ""
    code, _, err = run(capsys, "inspect", str(tmp_path / "missing.pem"))
    assert code == 1 and "missing" in err


def test_rotate_and_show(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "rotate", "--dir", str(store), "--grace", "2h")
    assert code == 0 and "generation 2 signs from now on" in out and "trusted until" in out
    assert "run `meshward bootstrap --renew` for each Envoy you run yourself before" in out
    code, out, _ = run(capsys, "show", "--dir", str(store), "--json")
    report = json.loads(out)
    assert report["active"] == 2 and len(report["bundle_sha256"]) == 2
    assert [g["trusted"] for g in report["generations"]] == [True, True]
    code, out, _ = run(capsys, "rotate", "--dir", str(store), "--grace", "0", "--json")
    report = json.loads(out)
    # generation 1 keeps its 2h deadline; generation 2 is dropped at once (grace 0)
    assert [(g["number"], g["trusted"]) for g in report["generations"]] == [
        (1, True),
        (2, False),
        (3, True),
    ]


def test_init_refuses_overwrite_and_bad_trust_domain(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "init", "--dir", str(store))
    assert code == 1 and "--force" in err
    code, _, err = run(capsys, "init", "--dir", str(store / "x"), "--trust-domain", "Cluster.Local")
    assert code == 1 and "lowercase" in err


def test_loose_key_permissions_stop_every_command(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (store / "gen-0001" / "root.key").chmod(0o644)
    code, _, err = run(
        capsys, "issue", "--dir", str(store), "--spiffe-id", FRONTEND, "--out", str(tmp_path / "o")
    )
    assert code == 1 and "chmod 600" in err
    assert not (tmp_path / "o").exists()


def test_expired_ca_issues_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    CertificateAuthority.init(
        tmp_path / "ca", TD, root_ttl=timedelta(days=1), now=datetime.now(UTC) - timedelta(days=2)
    )
    code, _, err = run(
        capsys,
        "issue",
        "--dir",
        str(tmp_path / "ca"),
        "--spiffe-id",
        FRONTEND,
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 1 and "expired" in err and "meshward ca rotate" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["issue", "--spiffe-id", FRONTEND],  # no --out
        ["issue", "--spiffe-id", FRONTEND, "--out", "x", "--ttl", "ten minutes"],
        ["rotate", "--grace", "1y"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ca", *args])
    assert exc.value.code == 2


def test_help_teaches_and_does_not_import_cryptography() -> None:
    # Only this group is configured: other groups' imports are not this package's business.
    code = (
        "import argparse, sys\n"
        "from meshward.certs import cli\n"
        "parser = argparse.ArgumentParser(prog='meshward ca')\n"
        "cli.configure(parser)\n"
        "print('cryptography' in sys.modules)\n"
        "parser.parse_args(['issue', '--help'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    first, _, help_text = result.stdout.partition("\n")
    assert first == "False"
    assert "examples:" in help_text and "key.pem" in help_text and "default: 1h" in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rotate", "--grace", "-5m"], "a duration cannot be negative"),
        (["issue", "--spiffe-id", FRONTEND, "--out", "x", "--ttl", "-1h"], "cannot be negative"),
        (["init", "--root-ttl", "-1d"], "cannot be negative"),
        (["init", "--intermediate-ttl", "-2d"], "cannot be negative"),
        (["issue", "--spiffe-id", FRONTEND, "--out", "x", "--ttl", "100000d"], "100 years"),
        (["rotate", "--grace", "9" * 60 + "d"], "too long"),
    ],
)
def test_negative_and_absurd_durations_are_usage_errors_that_say_why(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--grace -5m` used to end in argparse's "expected one argument" (it read -5m as an
    option), before the duration parser could say what was wrong."""
    with pytest.raises(SystemExit) as exc:
        main(["ca", *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert message in err and "expected one argument" not in err


def test_an_svid_ttl_is_capped_at_90_days_and_at_the_signer(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ca issue --ttl 1000d` used to issue an SVID living as long as the intermediate (5 years)."""
    base = ["issue", "--dir", str(store), "--spiffe-id", FRONTEND, "--out", str(tmp_path / "o")]
    code, _, err = run(capsys, *base, "--ttl", "1000d")
    assert code == 1 and "SVID TTL must be at most 90d" in err and "got 1000d" in err
    assert not (tmp_path / "o").exists()
    short = tmp_path / "short"
    code, _, _ = run(capsys, "init", "--dir", str(short), "--intermediate-ttl", "2d")
    assert code == 0
    base[2] = str(short)
    code, _, err = run(capsys, *base, "--ttl", "3d")
    assert code == 1 and "outlives the signing intermediate" in err and "meshward ca rotate" in err
    assert not (tmp_path / "o").exists()
    code, out, _ = run(capsys, *base, "--ttl", "1d", "--json")
    assert code == 0 and json.loads(out)["spiffe_id"] == FRONTEND
