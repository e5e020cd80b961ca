"""Integration fixtures shared across modules.

``demo_mesh``: one demo shop (control plane, ext_authz, five agent sidecars: what `meshward demo`
starts) for every test that needs a running demo mesh and not its start-up: the runbooks,
`meshward demo --attach`, `meshward status`. Starting it once instead of once per module saves
two whole mesh starts and stops. Each user leaves it as it found it (the runbooks reset the
policies first); the tour's live edits revert themselves.

The mesh stops right after the last test of this process that uses it (not at the end of the
session, while the unit tests still run): tests/conftest.py puts all its users in one xdist
group, so one worker runs all of them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshward.demo.topology import DemoMesh, MeshOptions, find_examples


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
