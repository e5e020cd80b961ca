"""Fixtures shared by every test layer: real Envoy processes, echo backends, an OTLP receiver.

Everything started here is stopped in the fixture's teardown, so a failing test leaves no
process behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from meshward.envoy import EnvoyProcess
from meshward.telemetry.collector import OtlpReceiver
from meshward.testing.echo import EchoServer

EnvoyFactory = Callable[..., EnvoyProcess]


#: Modules whose tests use a session-wide mesh of processes (tests/integration/conftest.py's
#: ``demo_mesh``): one xdist worker runs all of them, so that mesh starts once.
SHARED_MESH_MODULES = frozenset(
    {
        "tests/integration/test_demo.py",
        "tests/integration/test_runbooks.py",
        "tests/integration/test_status_cli.py",
    }
)
#: Long CPU-bound modules without module-scoped fixtures: their tests go to either worker.
SPLIT_MODULES = frozenset({"tests/unit/compile/test_simulated_equivalence.py"})


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs the suite on two xdist workers with ``--dist loadfile``: a module's
    tests run on one worker, so a module-scoped mesh (real Envoys, control plane, agents) starts
    once, not once per worker; the SHARED_MESH_MODULES count as one module, the SPLIT_MODULES'
    tests as modules of their own. Modules go out in collection order (faults and integration,
    the long ones, first; the many short unit modules fill the end), not largest-first by
    test count. (xdist's own ``loadgroup`` marks do nothing under pytest 9, whose node ids
    xdist can no longer rewrite.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedMeshScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module in SPLIT_MODULES:
                return nodeid
            return "shared-mesh" if module in SHARED_MESH_MODULES else module

    config.option.loadscopereorder = False
    return SharedMeshScheduling(config, log)


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker hands out ports from its own slice of meshward.net's range (the
    environment reaches the processes tests start), so two workers never pick the same port in
    the moment between choosing it and binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or not worker[2:].isdigit() or count < 2:
        return
    from meshward.net import DEFAULT_PORT_RANGE

    low, high = DEFAULT_PORT_RANGE
    width = (high - low) // count
    start = low + int(worker[2:]) * width
    os.environ["MESHWARD_PORT_RANGE"] = f"{start}-{start + width}"


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
