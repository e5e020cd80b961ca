"""Inputs a new user might type, each refused with a clear message and a meaningful exit code
(2: a bad flag value, 1: something to fix), never a traceback and never accepted silently.
Found by trying every command by hand; each of these used to be accepted or end in a trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshward.certs import CertificateAuthority
from meshward.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = str(ROOT / "examples")
README = str(ROOT / "README.md")


def _exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca"
    CertificateAuthority.init(path, "cluster.local")
    return str(path)


BOOT = ["bootstrap", "--workload", "shop/orders", "--xds", "127.0.0.1:15010"]


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--service-account", "BAD SA"], 1, "service account 'BAD SA' may contain only"),
        (["--trust-domain", "BAD"], 1, "trust domain 'BAD' must be lowercase"),
        (["--xds-identity", "xds"], 1, "'xds' is not a SPIFFE ID"),
        (["--path-prefix", "relative"], 1, "--path-prefix 'relative' must be an absolute path"),
        # no SVID yet and no token: nothing is generated, nothing is written
        ([], 1, "holds no valid SVID: first contact needs --join, --join-token-file, --root-cert"),
        (["--join", "127.0.0.1:1"], 1, "first contact needs --join-token-file, --root-cert"),
        (["--renew"], 1, "no valid SVID in"),
        (
            [
                "--join",
                "127.0.0.1:1",
                "--join-token-file",
                "/nonexistent/token",
                "--root-cert",
                README,
            ],
            1,
            "cannot read join token file /nonexistent/token",
        ),
        (["--ca", "certs/ca"], 2, "unrecognized arguments: --ca"),  # the node holds no CA
    ],
)
def test_bootstrap_refuses(
    extra: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = [] if "--out" in extra else ["--out", str(tmp_path / "out")]
    got, err = _exit([*BOOT, *out, *extra], capsys)
    assert got == code and message in err
    assert not (tmp_path / "out").exists()


def test_bootstrap_refuses_an_ads_port_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bootstrap", "--workload", "shop/orders", "--xds", "127.0.0.1:99999"]
    code, err = _exit([*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and "argument --xds: expected HOST:PORT" in err


def test_bootstrap_refuses_an_out_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("x")
    argv = [*BOOT, "--out", README, "--join", "127.0.0.1:1", "--join-token-file", str(token),
            "--root-cert", README]  # fmt: skip
    code, err = _exit(argv, capsys)
    assert code == 1 and "Not a directory" in err


def test_xds_serve_refuses_control_plane_secrets(
    ca_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The control plane never makes or sends a workload key: the old mode says why and what
    to do instead."""
    argv = ["xds", "serve", "--policy", EXAMPLES, "--ca", ca_dir, "--listen", "127.0.0.1:0"]
    code, err = _exit([*argv, "--secrets", "control-plane"], capsys)
    assert code == 1
    assert "--secrets control-plane is no longer supported" in err
    assert "never generates or transmits workload private keys" in err
    assert "meshward agent" in err and "meshward bootstrap" in err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--admin", "bad"], 2, "argument --admin: expected HOST:PORT, got 'bad'"),
        (["--admin", "127.0.0.1:99999"], 2, "argument --admin: expected HOST:PORT"),
        (["--watch-interval", "-1"], 2, "argument --watch-interval: must be a positive number"),
        (["--watch-interval", "0"], 2, "argument --watch-interval: must be a positive number"),
        (["--drift-threshold", "-5s"], 2, "a duration cannot be negative"),
        (["--ready-file", "/nonexistent-dir/ready.json"], 1, "its directory does not exist"),
        # Envoy listener addresses and STATIC endpoints are IP addresses; a name went into config
        (["--listen-host", "sidecar.local"], 2, "'sidecar.local' is not an IP address"),
        (["--app-host", "999.0.0.1"], 2, "'999.0.0.1' is not an IP address"),
    ],
)
def test_xds_serve_refuses_before_starting(
    extra: list[str], code: int, message: str, ca_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["xds", "serve", "--policy", EXAMPLES, "--ca", ca_dir, "--listen", "127.0.0.1:0"]
    got, err = _exit([*argv, *extra], capsys)
    assert got == code and message in err


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--timeout", "-5"], 2, "argument --timeout: must be a positive number"),
        (["--wait", "-1", "--attach", "x"], 2, "argument --wait: must be 0 or more"),
        (["--otlp-endpoint", "bad"], 2, "argument --otlp-endpoint: expected HOST:PORT"),
        (["--state", README], 1, f"--state {README}: cannot use it as a directory"),
    ],
)
def test_demo_refuses_before_starting_anything(
    extra: list[str], code: int, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got, err = _exit(["demo", *extra], capsys)
    assert got == code and message in err


def test_validate_counts_in_english(capsys: pytest.CaptureFixture[str]) -> None:
    orders, workloads = f"{EXAMPLES}/orders.yaml", f"{EXAMPLES}/workloads.yaml"
    assert main(["policy", "validate", orders, workloads]) == 0
    assert "1 authorization policy," in capsys.readouterr().out


@pytest.mark.parametrize("address", ["127.0.0.1:abc", "127.0.0.1:99999", "localhost", ""])
def test_status_refuses_an_address_that_is_not_one(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _exit(["status", "--xds", address], capsys)
    assert code == 2 and "argument --xds: expected HOST:PORT" in err


def test_explain_says_a_plaintext_call_to_strict_mtls_is_refused_before_any_http(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With a Host the sidecar would refuse too, it used to say "no authorization policy
    selects shop/orders", which orders-allow-frontend does."""
    argv = ["policy", "explain", EXAMPLES, "--workload", "shop/orders", "--host", "a b"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "refused before any HTTP: no authorization policy is evaluated" in out
    assert "no authorization policy selects" not in out


@pytest.mark.parametrize("value", ["0", "65536", "99999", "-1", "http", "80.5", ""])
def test_one_port_parser_words_a_bad_port_as_policy_files_do(value: str) -> None:
    """`--port` (policy explain) and any other port flag share cliutil.port_number; a bad value
    reads as it does in a policy file or a `policy test` case (policy.cases.check_port)."""
    import argparse

    from meshward.cliutil import port_number
    from meshward.policy.cases import check_port

    with pytest.raises(argparse.ArgumentTypeError) as caught:
        port_number(value)
    try:
        expected: object = int(value)
    except ValueError:
        expected = value
    with pytest.raises(ValueError) as reference:
        check_port(expected)
    assert str(caught.value) == str(reference.value)
    assert [port_number(v) for v in ("1", "8080", "65535")] == [1, 8080, 65535]


@pytest.mark.parametrize(
    "argv",
    [
        ["xds", "serve", "--listen"],
        ["xds", "serve", "--join-listen"],
        ["xds", "serve", "--admin"],
        ["agent", "--workload", "shop/orders", "--xds", "127.0.0.1:15010", "--health-listen"],
    ],
)
@pytest.mark.parametrize("value", ["bad", ":8080", "127.0.0.1:", "127.0.0.1:65536", "h:-1"])
def test_listen_addresses_share_one_check(
    argv: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every HOST:PORT a process listens on (port 0: any free port) goes through
    cliutil.listen_address; the control plane and the agent used to carry a copy each."""
    code, err = _exit([*argv, value], capsys)
    flag = argv[-1]
    assert code == 2 and f"argument {flag}: expected HOST:PORT, got {value!r}" in err
    assert "port 0: any free port" in err


def test_listen_address_takes_port_zero_and_connect_addresses_do_not() -> None:
    import argparse

    from meshward.cliutil import host_port, listen_address

    assert listen_address("127.0.0.1:0") == "127.0.0.1:0"
    assert listen_address("[::1]:65535") == "[::1]:65535"
    with pytest.raises(argparse.ArgumentTypeError):
        host_port("127.0.0.1:0")


ADMIN_READERS = [
    ["flows"],
    ["denials"],
    ["report"],
    ["policy", "suggest"],
    ["policy", "history"],
    ["policy", "rollback", "abc", "--policy-dir", "."],
]


@pytest.mark.parametrize("command", ADMIN_READERS, ids=lambda c: " ".join(c[:2]))
def test_commands_reading_the_admin_address_share_its_flags(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """One --xds/--timeout definition (xds.status_cli.add_admin_flags): the same check, the
    same default for every command that reads the control plane's admin address."""
    code, err = _exit([*command, "--xds", "127.0.0.1:abc"], capsys)
    assert code == 2 and "argument --xds: expected HOST:PORT (or http://HOST:PORT)" in err
    with pytest.raises(SystemExit):
        main([*command[:2], "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the running demo's, else 127.0.0.1:15011" in text
    assert "--timeout SECONDS" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--renew-fraction", "1"],
            "argument --renew-fraction: must be above 0 and below 1, got '1'",
        ),
        (["--renew-fraction", "nan"], "must be above 0 and below 1, got 'nan'"),
        (["--jitter", "0.5"], "argument --jitter: must be in [0, 0.5), got '0.5'"),
        (["--jitter", "lots"], "argument --jitter: expected a number, got 'lots'"),
    ],
)
def test_agent_timing_flags_share_the_number_parser(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """cliutil.number: the agent's fraction flags answer in the words every numeric flag uses."""
    code, err = _exit(["agent", "--workload", "shop/orders", *argv], capsys)
    assert code == 2 and message in err, err
