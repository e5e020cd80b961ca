"""Integration fixtures shared across modules.

``xds_serve``: `meshward xds serve` as a process over a policy directory, with a CA and orders'
app behind the port its bindings give orders' sidecar (the operator's path: a test then writes
`meshward bootstrap` files and starts Envoy from them).

``demo_mesh``: one demo shop (control plane, ext_authz, five agent sidecars: what `meshward demo`
starts) for every test that needs a running demo mesh and not its start-up: the runbooks,
`meshward demo --attach`, `meshward status`. Starting it once instead of once per module saves
two whole mesh starts and stops. Each user leaves it as it found it (the runbooks reset the
policies first); the tour's live edits revert themselves.

The mesh stops right after the last test of this process that uses it (not at the end of the
session, while the unit tests still run): tests/conftest.py sends the modules that use it to one
xdist worker.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshward.certs import CertificateAuthority
from meshward.demo.topology import DemoMesh, MeshOptions, find_examples
from meshward.net import free_port
from meshward.testing.echo import EchoServer
from meshward.testing.processes import Launcher, meshward_argv


@dataclass
class SharedDemo:
    mesh: DemoMesh
    state_dir: Path  # the demo's --state directory (state.json, ca/, agents/, policies/)
    pristine: Path  # its policy directory as the mesh started with it
    base: Path  # scratch space next to it
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.mesh.__exit__(None, None, None)
        # stopping marks the recorded state as no longer running (what `meshward denials`
        # and `meshward status` go by)
        assert json.loads((self.state_dir / "state.json").read_text())["running"] is False


_users_left: dict[str, int] = {"demo_mesh": 0}
_shared: list[SharedDemo] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    _users_left["demo_mesh"] = sum("demo_mesh" in item.fixturenames for item in session.items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    yield  # the test's own fixtures are down
    if "demo_mesh" in item.fixturenames:  # type: ignore[attr-defined]
        _users_left["demo_mesh"] -= 1
        if _users_left["demo_mesh"] <= 0:
            for shared in _shared:
                shared.stop()


@pytest.fixture(scope="session")
def demo_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedDemo]:
    base = tmp_path_factory.mktemp("demo-mesh")
    state_dir = base / "mesh"
    mesh = DemoMesh(MeshOptions(state_dir=state_dir, examples=find_examples()), quiet=True)
    mesh.__enter__()
    try:
        state = mesh.state
        assert state is not None and state.xds_admin and state.ads
        pristine = base / "pristine"
        shutil.copytree(state.policy_dir, pristine)
        shared = SharedDemo(mesh, state_dir, pristine, base)
        _shared.append(shared)
    except BaseException:
        mesh.__exit__(None, None, None)
        raise
    try:
        yield shared
    finally:
        _shared.remove(shared)
        shared.stop()


# -- `meshward xds serve` as a process ---------------------------------------------------------------
@dataclass
class XdsServe:
    """A `meshward xds serve` process over ``policies`` with a fresh CA in ``ca``, and orders'
    app (an echo server) behind the sidecar port ``listen`` its bindings name."""

    policies: Path
    ca: Path
    listen: int  # shop/orders' inbound port 8080, as bindings.json says
    info: dict[str, Any]  # what the server wrote to its --ready-file (ads, admin, version)
    launcher: Launcher

    @property
    def admin(self) -> str:
        """The admin address as `--xds` takes it (host:port)."""
        return str(self.info["admin"]).removeprefix("http://")

    def stop(self) -> int | None:
        """SIGTERM; the exit code (0: a clean exit)."""
        return self.launcher.stop("xds", 15)

    def __enter__(self) -> XdsServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.launcher.stop_all()  # the test checks the exit code itself, with stop()


@pytest.fixture
def xds_serve(tmp_path: Path) -> Iterator[Callable[..., XdsServe]]:
    """``with xds_serve({"file.yaml": text}, *flags) as server:`` writes the policy directory,
    starts the server with ``flags`` added and waits for its ready file; stopped at the end of
    the block (and at teardown) if the test did not."""
    with contextlib.ExitStack() as stack:
        servers: list[XdsServe] = []

        def start(policy_files: Mapping[str, str], *flags: str) -> XdsServe:
            ca, policies = tmp_path / "ca", tmp_path / "policies"
            CertificateAuthority.init(ca, "cluster.local")
            policies.mkdir()
            for name, text in policy_files.items():
                (policies / name).write_text(text)
            app = stack.enter_context(EchoServer("orders"))
            listen = free_port()
            bindings = tmp_path / "bindings.json"
            bindings.write_text(json.dumps({
                "shop/orders": {"ports": {"8080": {"listen": f"127.0.0.1:{listen}",
                                                   "app": f"127.0.0.1:{app.port}"}}}
            }))  # fmt: skip
            launcher = Launcher(tmp_path, quiet=True)
            ready = tmp_path / "ready.json"
            info = launcher.start("xds", meshward_argv(
                "xds", "serve", "--policy", str(policies), "--ca", str(ca),
                "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--bindings", str(bindings), "--ready-file", str(ready),
                "--join-listen", "127.0.0.1:0", *flags,
            ), ready_path=ready)  # fmt: skip
            servers.append(XdsServe(policies, ca, listen, info, launcher))
            stack.callback(launcher.stop_all)
            return servers[-1]

        yield start
