"""Runtime values Meshward sets in every sidecar bootstrap, and the compiler checks against.

Envoy refuses a regex whose RE2 program is larger than the runtime key
``re2.max_program_size.error_level`` (default 100). Meshward sets the key explicitly to the
value :mod:`meshward.compile.envoy_limits` checks, so "validate accepts it" and "the sidecar
accepts it" use the same number even if Envoy's default changes.
"""

from __future__ import annotations

from typing import Any

RE2_RUNTIME_KEY = "re2.max_program_size.error_level"
MAX_RE2_PROGRAM_SIZE = 100


def re2_runtime() -> dict[str, Any]:
    """A bootstrap ``layered_runtime`` with Meshward's static layer."""
    return {
        "layers": [
            {"name": "meshward-limits", "static_layer": {RE2_RUNTIME_KEY: MAX_RE2_PROGRAM_SIZE}}
        ]
    }
