"""Fixtures shared by every test layer: real Envoy processes, echo backends, an OTLP receiver.

Everything started here is stopped in the fixture's teardown, so a failing test leaves no
process behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from meshward.envoy import EnvoyProcess
from meshward.telemetry.collector import OtlpReceiver
from meshward.testing.echo import EchoServer

EnvoyFactory = Callable[..., EnvoyProcess]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the suite on two xdist workers with ``--dist loadgroup``: every test
    goes to the worker that runs the rest of its module, so a module-scoped mesh (real Envoys,
    control plane, agents) starts once, not once per worker. A test that names a group of its
    own (``xdist_group``) keeps it. The users of a session-wide mesh (SHARED_MESHES) form one
    group across modules, so that mesh too starts once."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        shared = [f for f in SHARED_MESHES if f in getattr(item, "fixturenames", ())]
        group = shared[0] if shared else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


#: session-scoped fixtures that start a mesh of processes (tests/integration/conftest.py)
SHARED_MESHES = ("demo_mesh",)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with EchoServer("echo") as server:
        yield server


@pytest.fixture
def envoy_factory(tmp_path: Path) -> Iterator[EnvoyFactory]:
    """Start Envoys with ``envoy_factory(config, name=...)``; all are stopped at teardown.

    On failure the log tail of each Envoy is attached to the test report (captured output).
    """
    started: list[EnvoyProcess] = []

    def start(
        config: Mapping[str, Any], *, name: str = "envoy", wait: bool = True, **kwargs: Any
    ) -> EnvoyProcess:
        envoy = EnvoyProcess(
            config, name=name, workdir=tmp_path / f"{name}-{len(started)}", **kwargs
        )
        started.append(envoy)
        envoy.start(wait=wait)
        return envoy

    yield start
    for envoy in started:
        envoy.stop()
        print(f"--- {envoy.name} log tail ---\n{envoy.log_tail(15)}")


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver
