"""The edit timeline: a policy file edit's stages, as the control plane saw them, in order, in
/status (what the fleet benchmark prints beside the convergence time)."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from meshward.certs import CertificateAuthority
from meshward.compile import CompileOptions
from meshward.xds.compile_adapter import compiler_for
from meshward.xds.service import XdsServiceThread
from meshward.xds.timeline import STAGES, EditTimeline

WORKLOADS = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec: {ports: [{name: http, port: 8080, protocol: HTTP}]}
"""
POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  rules: [{to: [{operation: {methods: [%s]}}]}]
"""


def test_a_watched_edit_records_every_stage_in_order(tmp_path: Path) -> None:
    (tmp_path / "w.yaml").write_text(WORKLOADS)
    (tmp_path / "p.yaml").write_text(POLICY % "GET")
    ca = CertificateAuthority.ephemeral("cluster.local")
    with XdsServiceThread(
        None, ca, compiler_for(CompileOptions()), admin=None,
        policy_paths=[tmp_path], watch_interval=0.05,
    ) as xds:  # fmt: skip
        before = xds.status()["policy"]
        assert before["last_change"] is None  # nothing changed since the start
        written = time.time()
        (tmp_path / "p.yaml").write_text(POLICY % "PUT")
        deadline = time.monotonic() + 30
        while True:
            change = xds.status()["policy"]["last_change"]
            if change is not None and "pushed" in change["seconds"]:
                break
            assert time.monotonic() < deadline, change
            time.sleep(0.02)
        assert change["version"] == xds.status()["policy"]["version"] != before["version"]
        assert list(change["seconds"]) == list(STAGES)  # every stage, in order
        instants = [datetime.fromisoformat(change[f"{s}_at"]).timestamp() for s in STAGES]
        assert instants == sorted(instants) and instants[0] >= written - 0.01
        assert change["seconds"]["detected"] == 0


def test_a_stage_of_another_version_starts_a_new_change() -> None:
    clock = iter([1.0, 2.0, 3.0]).__next__
    timeline = EditTimeline(clock)
    timeline.begin("a", {"detected": 0.5, "loaded": 0.75, "unknown": 9.0})
    timeline.mark("a", "compiled")
    timeline.mark("a", "compiled")  # the first instant of a stage stays
    assert timeline.marks == {"detected": 0.5, "loaded": 0.75, "compiled": 1.0}
    timeline.mark("b", "compiled")  # applied without the watcher (apply_policy)
    status = timeline.status()
    assert status is not None and status["version"] == "b"
    assert status["seconds"] == {"compiled": 0.0}
