"""History and rollback end to end: `meshward xds serve` as a process with a real Envoy sidecar;
two policy versions applied through the watched directory, `meshward policy history` lists them
with what each change did, `meshward policy rollback` puts the first back, the control plane
serves it, the sidecar ACKs it and enforces it again, and the audit log has every change."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from meshward.cli import main
from meshward.envoy import EnvoyProcess
from meshward.testing.mesh import bootstrap_sidecar
from meshward.testing.topology import shop_yaml
from meshward.testing.xds_resources import http_request

WORKLOADS = shop_yaml(["orders", "frontend"], mtls="PERMISSIVE")
DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"""


def _wait_for(check, what: str, seconds: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    data: dict = json.loads(capsys.readouterr().out)  # type: ignore[type-arg]
    return data


def test_apply_two_versions_then_roll_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], xds_serve: Any
) -> None:
    history_dir = tmp_path / "history"
    with xds_serve(  # tests/integration/conftest.py
        {"workloads.yaml": WORKLOADS},
        "--flows-db", "off", "--history", "3", "--history-dir", str(history_dir),
        "--watch-interval", "0.2",
    ) as server:  # fmt: skip
        policies, listen, info = server.policies, server.listen, server.info
        try:
            admin = info["admin"].removeprefix("http://")
            v1 = info["policy_version"]
            sidecar = bootstrap_sidecar(tmp_path / "ca", "shop/orders", info["ads"],
                                        info["join"], tmp_path / "sidecars")  # fmt: skip
            config = json.loads(Path(sidecar["bootstrap"]).read_text())
            with EnvoyProcess(config, name="orders", workdir=tmp_path / "envoy") as envoy:
                _wait_for(lambda: http_request(listen, "/admin")[0] == 200, envoy.log_tail())

                # version 2: /admin denied
                (policies / "deny.yaml").write_text(DENY_ADMIN)
                _wait_for(lambda: http_request(listen, "/admin")[0] == 403, "v2 enforced")
                history = _json(capsys, ["policy", "history", "--xds", admin, "--json"])
                v2 = history["current"]
                assert v2 != v1
                newest, first = history["entries"]
                assert (first["version"], first["action"]) == (v1, "start")
                assert (newest["version"], newest["action"], newest["previous"]) == (
                    v2, "apply", v1,
                )  # fmt: skip
                assert newest["workloads"] == ["shop/orders"]
                assert {"source": "shop/frontend", "destination": "shop/orders", "port": 8080,
                        "method": "GET", "path": "/admin"} in newest["closed"]  # fmt: skip
                assert newest["opened"] == []
                capsys.readouterr()
                assert main(["policy", "history", "--xds", admin]) == 0
                text = capsys.readouterr().out
                assert (
                    f"* {v2[:12]}" in text
                    and "- shop/frontend -> shop/orders:8080 GET /admin" in text
                )

                # roll back to version 1 by prefix; waits until applied and ACKed
                result = _json(capsys, ["policy", "rollback", v1[:12], "--xds", admin,
                                        "--policy-dir", str(policies), "--json"])  # fmt: skip
                assert result["version"] == v1
                assert result["status"]["converged"] is True
                assert result["status"]["connected"] == 1 == result["status"]["in_sync"]
                assert sorted(p.name for p in policies.glob("*.yaml")) == [f"policy-{v1[:12]}.yaml"]
                moved = sorted(Path(p).name for p in result["moved"])
                assert moved == ["deny.yaml", "workloads.yaml"]
                assert http_request(listen, "/admin")[0] == 200  # the sidecar enforces v1 again
                status = _json(capsys, ["status", "--xds", admin, "--json"])
                assert status["policy"]["version"] == v1
                [node] = status["nodes"]
                assert node["node"] == "shop/orders"
                assert node["drift"] is False
                assert node["streams"] and all(
                    t["in_sync"] for s in node["streams"] for t in s["types"]
                )

                history = _json(capsys, ["policy", "history", "--xds", admin, "--json"])
                entry = history["entries"][0]
                assert (entry["version"], entry["action"], entry["restores"]) == (
                    v1, "rollback", first["applied_at"],
                )  # fmt: skip
                assert {"source": "shop/frontend", "destination": "shop/orders", "port": 8080,
                        "method": "GET", "path": "/admin"} in entry["opened"]  # fmt: skip
                capsys.readouterr()
                assert main(["policy", "history", "--xds", admin]) == 0
                marked = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("*")]
                assert marked == [ln for ln in marked if "rollback" in ln] and len(marked) == 1

                # an unknown version is a clear error, nothing is touched
                capsys.readouterr()
                assert main(["policy", "rollback", "0" * 12, "--xds", admin,
                             "--policy-dir", str(policies)]) == 1  # fmt: skip
                assert "not in the history" in capsys.readouterr().err
                assert sorted(p.name for p in policies.glob("*.yaml")) == [f"policy-{v1[:12]}.yaml"]
                # the wrong directory: nothing the control plane watches changes, it says so
                elsewhere = tmp_path / "elsewhere"
                elsewhere.mkdir()
                capsys.readouterr()
                assert main(["policy", "rollback", v2, "--xds", admin, "--policy-dir",
                             str(elsewhere), "--wait", "1"]) == 1  # fmt: skip
                out = capsys.readouterr().out
                assert "NOT converged within 1s" in out and "`xds serve --policy` watches" in out
        finally:
            assert server.stop() == 0  # SIGTERM: a clean exit
    audit = [json.loads(line) for line in (history_dir / "audit.log").read_text().splitlines()]
    assert [a["action"] for a in audit] == ["start", "apply", "rollback"]
    assert [a["version"] for a in audit] == [v1, v2, v1]
    # content-addressed: each kept set file is named by the SHA-256 of its canonical form
    assert sorted(p.stem for p in (history_dir / "sets").glob("*.yaml")) == sorted({v1, v2})
