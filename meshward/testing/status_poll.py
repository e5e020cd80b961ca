"""Asking the control plane whether every sidecar runs what it should (its admin ``/status``).

The tour's live policy edit is only meaningful once every sidecar has ACKed the new version, so
both the startup and the edit wait on the same check: the policy version in force is the one
expected, and every node is connected with every subscribed xDS type in sync.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any


def fetch_status(admin_url: str, timeout: float = 2.0) -> dict[str, Any]:
    url = admin_url.rstrip("/") + "/status?view=nodes"  # the demo has a handful of nodes
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


def lagging(
    status: Mapping[str, Any], refs: Iterable[str], policy_version: str | None = None
) -> list[str]:
    """What is not converged yet, one phrase each; empty when converged (pure)."""
    problems: list[str] = []
    policy = status.get("policy") or {}
    if policy_version is not None and policy.get("version") != policy_version:
        current = str(policy.get("version") or "?")[:12]
        problems.append(f"control plane serves policy {current}, want {policy_version[:12]}")
    if policy.get("error"):
        problems.append(f"last policy change rejected: {policy['error']}")
    nodes = {n.get("node"): n for n in status.get("nodes") or ()}
    for ref in refs:
        node = nodes.get(ref)
        if node is None or not node.get("connected"):
            problems.append(f"{ref}: not connected")
            continue
        streams = node.get("streams") or ()
        if not streams:
            problems.append(f"{ref}: no ADS stream")
        for stream in streams:
            types = stream.get("types") or ()
            if not types:
                problems.append(f"{ref}: nothing subscribed yet")
            behind = [t.get("type", "?") for t in types if not t.get("in_sync")]
            if behind:
                problems.append(f"{ref}: {'/'.join(behind)} not ACKed yet")
    return problems


def converged(
    status: Mapping[str, Any], refs: Iterable[str], policy_version: str | None = None
) -> bool:
    return not lagging(status, refs, policy_version)
