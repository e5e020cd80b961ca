"""`meshward xds serve` refuses what it cannot do, with one clear line and no traceback: an ADS
port another control plane holds (gRPC would share it through SO_REUSEPORT), and policies that
need ext_authz when no ``--extauthz`` was given. The ext_authz server refuses a taken port too
unless it runs ``--workers`` (which share one port on purpose)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pytest

from meshward.certs import CertificateAuthority
from meshward.compile import CompileOptions
from meshward.errors import UserError
from meshward.extauthz.server import ExtAuthzServer
from meshward.policy import parse
from meshward.testing.processes import Launcher, meshward_argv
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.server import AddressInUse
from meshward.xds.service import XdsService

WORKLOAD = """\
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}
"""
CUSTOM = """\
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hook, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: CUSTOM
  provider: {name: hook}
  rules: [{to: [{operation: {paths: ["/custom*"]}}]}]
"""


def serve_argv(tmp_path: Path, policy: str, *extra: str) -> list[str]:
    if not (tmp_path / "ca").exists():
        CertificateAuthority.init(tmp_path / "ca", "cluster.local")
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "mesh.yaml").write_text(policy)
    return meshward_argv("xds", "serve", "--policy", str(policies),
                         "--ca", str(tmp_path / "ca"), "--access-log", "off", *extra)  # fmt: skip


def run_to_exit(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A server expected to refuse to start: its exit code, stdout and stderr apart."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_a_second_control_plane_on_a_taken_ads_port_refuses_to_start(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    with Launcher(tmp_path, quiet=True) as launcher:
        argv = serve_argv(tmp_path, WORKLOAD, "--listen", "127.0.0.1:0", "--admin",
                          "127.0.0.1:0", "--ready-file", str(ready))  # fmt: skip
        ads = launcher.start("first", argv, ready_path=ready)["ads"]
        # Another CA, same port: before the fix gRPC's SO_REUSEPORT let it share the port.
        second_dir = tmp_path / "second"
        second_dir.mkdir()
        second = run_to_exit(
            serve_argv(second_dir, WORKLOAD, "--listen", ads, "--admin", "127.0.0.1:0")
        )
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr
        assert f"cannot listen on {ads}: the address is in use" in second.stderr
        assert launcher["first"].alive()  # the first one keeps serving
        assert launcher.stop("first", 15) == 0


async def test_the_ads_server_never_shares_its_port() -> None:
    ca = CertificateAuthority.ephemeral("cluster.local")
    compiler = compiler_for(CompileOptions())
    first = XdsService(parse({"m.yaml": WORKLOAD}), ca, compiler, admin=None)
    await first.start()
    try:
        second = XdsService(
            parse({"m.yaml": WORKLOAD}), ca, compiler, listen=first.address, admin=None
        )
        with pytest.raises(AddressInUse, match="in use"):
            await second.start()
        # An admin port that is taken releases the ADS port it had bound already.
        third = XdsService(parse({"m.yaml": WORKLOAD}), ca, compiler, admin=first.address)
        with pytest.raises(OSError):
            await third.start()
        assert third.ads._server is None
    finally:
        await first.stop()
        await asyncio.sleep(0)


def test_policies_needing_ext_authz_without_extauthz_refuse_with_one_line(
    tmp_path: Path,
) -> None:
    process = run_to_exit(
        serve_argv(tmp_path, WORKLOAD + CUSTOM, "--listen", "127.0.0.1:0", "--admin", "off")
    )
    stdout, stderr = process.stdout, process.stderr
    assert process.returncode == 1, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "refusing to start: 1 workload(s) cannot be compiled (shop/orders)" in lines[0]
    assert "--extauthz" in lines[0]


def test_with_extauthz_the_same_policies_start(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    argv = serve_argv(tmp_path, WORKLOAD + CUSTOM, "--listen", "127.0.0.1:0", "--admin", "off",
                      "--extauthz", "127.0.0.1:9191", "--ready-file", str(ready))  # fmt: skip
    with Launcher(tmp_path, quiet=True) as launcher:
        launcher.start("xds", argv, ready_path=ready)
        assert launcher.stop("xds", 15) == 0
        assert "Traceback" not in launcher["xds"].log()


class _Allow:
    def check(self, request: object, metadata: object = None) -> object:
        raise AssertionError("never called")


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_single_worker_extauthz_refuses_a_taken_port(kind: str) -> None:
    with ExtAuthzServer(_Allow(), kind=kind) as holder:  # type: ignore[arg-type]
        other = ExtAuthzServer(_Allow(), port=holder.port, kind=kind)  # type: ignore[arg-type]
        with pytest.raises(UserError, match="in use"):
            other.start()
        other.stop()


async def test_a_running_server_logs_one_line_per_workload_for_a_change_it_cannot_compile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = CertificateAuthority.ephemeral("cluster.local")
    service = XdsService(
        parse({"m.yaml": WORKLOAD}), ca, compiler_for(CompileOptions()), admin=None
    )
    await service.start()
    try:
        before = service.control.configs["shop/orders"].fingerprint
        with caplog.at_level(logging.ERROR, logger="meshward.xds"):
            service.control.apply_policy(parse({"m.yaml": WORKLOAD + CUSTOM}))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is None  # one line, no traceback
        assert "needs the ext_authz service" in errors[0].getMessage()
        assert service.control.configs["shop/orders"].fingerprint == before  # last good kept
        assert "shop/orders" in service.control.compile_errors()
    finally:
        await service.stop()
