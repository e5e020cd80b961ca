"""The demo's processes are started by the one launcher of the project,
:mod:`meshward.testing.processes`; these names stay importable from here."""

from __future__ import annotations

from meshward.testing.processes import (
    Component,
    ComponentFailed,
    Launcher,
    ReadyCheck,
    Supervisor,
)

__all__ = ["Component", "ComponentFailed", "Launcher", "ReadyCheck", "Supervisor"]
