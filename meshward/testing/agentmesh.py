"""Kept for imports written before the one mesh builder: see :mod:`meshward.testing.mesh`."""

from meshward.testing.mesh import AgentMesh

__all__ = ["AgentMesh"]
