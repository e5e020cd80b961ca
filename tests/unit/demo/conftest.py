"""Log lines from a real demo run, for the evidence and denials tests (see logsamples.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest


def _load() -> ModuleType:
    # --import-mode=importlib: test modules cannot import their neighbours by name.
    spec = importlib.util.spec_from_file_location(
        "meshward_demo_logsamples", Path(__file__).with_name("logsamples.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def S() -> ModuleType:
    return _load()
