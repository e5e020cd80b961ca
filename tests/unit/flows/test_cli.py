"""`meshward flows`, `meshward denials --xds` and `xds serve --flows-db`: usage errors and
unreachable stores are clear messages with meaningful exit codes, never tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from meshward.cli import main


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    assert main(["ca", "init", "--dir", str(tmp_path / "ca")]) == 0
    return tmp_path / "ca"


def serve(ca_dir: Path, flows_db: str) -> list[str]:
    examples = Path(__file__).resolve().parents[3] / "examples"
    return ["xds", "serve", "--policy", str(examples), "--ca", str(ca_dir), "--listen",
            "127.0.0.1:0", "--admin", "127.0.0.1:0", "--extauthz", "127.0.0.1:9191",
            "--flows-db", flows_db]  # fmt: skip


@pytest.mark.parametrize(
    ("flows_db", "message"),
    [
        ("mysql://x/y", "use a file path or postgresql://"),
        ("/no-such-directory-meshward/flows.db", "its directory does not exist"),
        ("postgresql://nobody@127.0.0.1:1/x", "cannot open the flow store"),
    ],
)
def test_xds_serve_refuses_a_bad_flows_db(
    ca_dir: Path, flows_db: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(serve(ca_dir, flows_db)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["flows", "--xds", "abc"],
        ["flows", "--decision", "maybe"],
        ["flows", "--limit", "0"],
        ["flows", "--from", "nonsense"],
        ["denials", "--xds", "127.0.0.1:abc"],
        ["report", "--xds", "abc"],
        ["report", "--since", "soon"],
        ["report", "--expiring-within", "-1h"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_unreachable_control_plane_exits_1() -> None:
    """In a process of its own: stderr holds only what the command printed (servers that other
    tests left running in this process may print to it)."""
    for command in ("flows", "denials"):
        done = subprocess.run(
            [sys.executable, "-m", "meshward", command, "--xds", "127.0.0.1:1", "--timeout", "1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert "cannot read" in done.stderr and "Traceback" not in done.stderr
