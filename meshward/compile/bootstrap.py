"""A static Envoy bootstrap from compiled resources: how tests (and `--mode validate`) load a
workload's config without a control plane.

Only for ``Mode.STATIC`` output: there every secret reference is a bare name, resolved from
``static_resources.secrets``, and clusters and routes are inline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshward.compile.options import Mode
from meshward.compile.workload import WorkloadResources, to_dict
from meshward.envoy.runtime import re2_runtime

Json = dict[str, Any]


def static_bootstrap(
    resources: WorkloadResources,
    secrets: Sequence[Any] = (),
    *,
    node_id: str | None = None,
    admin_socket: str | None = None,
) -> Json:
    """A complete bootstrap dict (Envoy JSON) for ``resources`` with ``secrets`` (Secret protos
    or dicts) inline. Without secrets, a config that references them will not load.
    ``admin_socket``: Envoy's admin on that Unix socket, mode 0600 (never a TCP port, which
    any local process could use to drain or stop the sidecar)."""
    if resources.mode is not Mode.STATIC:
        raise ValueError("static_bootstrap needs resources compiled with Mode.STATIC")
    node = node_id or resources.workload
    bootstrap: Json = {
        "node": {"id": node, "cluster": resources.workload.replace("/", ".")},
        "static_resources": {
            "listeners": [to_dict(m) for m in resources.listeners],
            "clusters": [to_dict(m) for m in resources.clusters],
        },
        "layered_runtime": re2_runtime(),  # the RE2 limit policy validation checks against
    }
    if secrets:
        bootstrap["static_resources"]["secrets"] = [
            s if isinstance(s, dict) else to_dict(s) for s in secrets
        ]
    if admin_socket is not None:
        bootstrap["admin"] = {"address": {"pipe": {"path": admin_socket, "mode": 0o600}}}
    return bootstrap
