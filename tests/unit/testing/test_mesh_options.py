"""The one mesh builder's process options: what it refuses, and the command lines it builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshward.testing.mesh import Mesh
from meshward.testing.processes import Launcher
from meshward.testing.servers import ServerProcesses, pin


def test_pin_replaces_a_flag_value_or_appends_it() -> None:
    argv = ["x", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    assert pin(argv, "--listen", "127.0.0.1:4000") == [
        "x", "--listen", "127.0.0.1:4000", "--admin", "127.0.0.1:0",
    ]  # fmt: skip
    assert pin(argv, "--join-listen", "127.0.0.1:5") == [*argv, "--join-listen", "127.0.0.1:5"]
    assert argv[2] == "127.0.0.1:0"  # the original is left alone


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"control_plane": "process", "sidecars": "bootstrap"}, "agent sidecars"),
        ({"control_plane": "process", "compiler_hook": lambda w, r: r}, "compiler hook"),
        ({"extauthz": ["--workers", "1"]}, "extauthz runs as a process"),
        ({"control_plane": "container"}, "'thread' or 'process'"),
        ({"apps": "pods"}, "'thread' or 'process'"),
    ],
)
def test_mesh_refuses_options_it_cannot_honour(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Mesh(tmp_path / "policies", tmp_path, ["shop/a"], **options)  # type: ignore[arg-type]


def _servers(tmp_path: Path, extauthz: list[str] | None) -> ServerProcesses:
    return ServerProcesses(
        Launcher(tmp_path, quiet=True),
        tmp_path / "run",
        policy_dir=tmp_path / "policies",
        ca_dir=tmp_path / "ca",
        bindings_file=tmp_path / "bindings.json",
        xds_args=["--watch-interval", "0.2"],
        extauthz_args=extauthz,
    )


def test_the_control_plane_process_binds_port_zero_and_keeps_keys_off_it(tmp_path: Path) -> None:
    servers = _servers(tmp_path, None)
    argv = servers.xds_argv
    assert not any(a.startswith("--secrets") for a in argv)  # node-held keys are the only mode
    for flag in ("--listen", "--admin", "--join-listen"):
        assert argv[argv.index(flag) + 1] == "127.0.0.1:0", flag
    assert "--extauthz" not in argv and servers.extauthz_argv is None
    assert argv[argv.index("--watch-interval") + 1] == "0.2"


def test_ext_authz_gets_a_port_the_control_plane_names(tmp_path: Path) -> None:
    servers = _servers(tmp_path, ["--workers", "1"])
    assert servers.extauthz_argv is not None and servers.extauthz_port > 0
    address = f"127.0.0.1:{servers.extauthz_port}"
    assert servers.extauthz_argv[servers.extauthz_argv.index("--listen") + 1] == address
    assert servers.xds_argv[servers.xds_argv.index("--extauthz") + 1] == address
    with pytest.raises(ValueError, match="no server 'envoy'"):
        servers.start("envoy")
