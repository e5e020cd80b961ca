"""Fixtures shared by the xDS unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshward.xds.compile_adapter import compiler_for
from meshward.xds.compile_process import CompileProcess
from tests.unit.xds.test_compile_process import OPTIONS


@pytest.fixture(scope="module")
def process() -> Iterator[CompileProcess]:
    """A compile worker process (one per test module: its state carries over between a
    module's tests, as the control plane's does between compiles)."""
    made = compiler_for(OPTIONS, process=True).config_compiler()
    assert isinstance(made, CompileProcess)
    yield made
    made.close()
