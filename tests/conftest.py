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
