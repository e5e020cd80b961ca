"""The `meshward` entry point's contract: help that teaches, exit codes 0 / 1 / 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshward import __version__
from meshward.cli import GROUPS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_group() -> None:
    result = run("--help")
    assert result.returncode == 0
    for name, _, _ in GROUPS:
        assert f"\n    {name}" in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"meshward {__version__}"


@pytest.mark.parametrize("name", [name for name, _, _ in GROUPS])
def test_every_group_has_help(name: str) -> None:
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: meshward " + name)


def test_unknown_command_is_a_usage_error() -> None:
    result = run("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_no_command_is_a_usage_error() -> None:
    result = run()
    assert result.returncode == 2
    assert "usage: meshward" in result.stderr


def test_user_error_is_one_line_without_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MESHWARD_ENVOY", str(tmp_path / "no-such-envoy"))
    result = subprocess.run(
        [sys.executable, "-m", "meshward", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("meshward: error: ")


def test_doctor_passes_on_this_installation() -> None:
    result = run("doctor", "--json")
    assert result.returncode == 0, result.stderr
    assert '"ok": true' in result.stdout


def _into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a real pipe whose reader is already gone (`... | head` once head exits):
    the first write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "meshward", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "args",
    [
        ("policy", "compile", "examples/", "--workload", "shop/orders", "--json"),
        ("policy", "explain", "examples/", "--workload", "shop/orders", "--json"),
        ("policy", "validate", "examples/", "--json"),
        ("policy", "test", "examples/", "--cases", "examples/cases.yaml"),
        ("--help",),
        ("policy", "compile", "--help"),
    ],
)
def test_output_into_a_closed_pipe_ends_quietly(args: tuple[str, ...]) -> None:
    result = _into_closed_pipe(*args)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr
    assert result.stderr == ""
    # 141: as a shell reports a process killed by SIGPIPE; argparse swallows write errors of
    # --help itself, so there nothing is left to fail and it exits 0
    assert result.returncode == (0 if "--help" in args else 141)


def test_an_svid_ttl_beyond_90_days_stops_xds_serve_before_it_starts(tmp_path) -> None:
    result = run(
        "xds", "serve", "--policy", "examples/", "--ca", str(tmp_path), "--svid-ttl", "1000d"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--svid-ttl: SVID TTL must be at most 90d" in result.stderr


@pytest.mark.parametrize("timeout", ["-1", "0", "soon", "inf"])
def test_status_timeout_must_be_a_positive_number(timeout: str) -> None:
    result = run("status", "--timeout", timeout)
    assert result.returncode == 2 and "argument --timeout" in result.stderr
