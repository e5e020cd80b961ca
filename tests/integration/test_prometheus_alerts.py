"""A real Prometheus (Debian's ``prometheus``) scrapes a local mesh's control plane, evaluates
the shipped denied-flow-spike rule, and fires it after a burst of denied requests through real
Envoy sidecars.

The rule is deploy/prometheus/alerts.yml's own expression and labels with its timing shortened
(rate window 10s instead of 1m, ``for`` 2s instead of 1m) so the test takes seconds."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.net import free_port
from meshward.testing.mesh import Mesh
from meshward.testing.processes import Launcher
from meshward.testing.topology import allow_doc, shop_yaml
from meshward.testing.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
FRONTEND, ORDERS = "shop/frontend", "shop/orders"
POLICY = shop_yaml(
    ["frontend", "orders"], allow_doc("orders-allow-get", "orders", methods=["GET"]), mtls=None
)

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus missing: `make venv` installs Debian's prometheus"
)


def spike_rule() -> dict[str, Any]:
    groups = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
    rule = next(
        r for g in groups for r in g["rules"] if r.get("alert") == "MeshwardDeniedFlowSpike"
    )
    assert "[1m]" in rule["expr"]
    return {**rule, "expr": rule["expr"].replace("[1m]", "[10s]"), "for": "2s"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("prom-mesh")
    policies = base / "policies"
    policies.mkdir()
    (policies / "mesh.yaml").write_text(POLICY)
    with Mesh(policies, base / "run", [FRONTEND, ORDERS], flows_db=base / "flows.db") as m:
        yield m


@pytest.fixture(scope="module")
def prometheus(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("prometheus")
    rules = base / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "meshward", "rules": [spike_rule()]}]}))
    target = mesh.xds.admin_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "meshward-control-plane",
                            "static_configs": [{"targets": [target]}]}],
    }  # fmt: skip
    (base / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with Launcher(base, quiet=True, logs=base) as launcher:  # its log: base/prometheus.log
        launcher.launch(
            "prometheus",
            [PROMETHEUS or "", f"--config.file={base / 'prometheus.yml'}",
             f"--storage.tsdb.path={base / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            ready=lambda: get(url, "/-/ready") is not None,
            timeout=20,
        )  # fmt: skip
        launcher.wait_ready(["prometheus"])
        yield url
        launcher.stop("prometheus", timeout=10)


def get(base: str, path: str) -> Any:
    try:
        with urllib.request.urlopen(base + path, timeout=2) as response:
            body = response.read()
    except OSError:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body


def wait(check: Any, timeout: float, what: str) -> Any:
    return wait_until(check, timeout, what, interval=0.25)  # each check queries Prometheus


def spike_alerts(url: str) -> list[dict[str, Any]]:
    body = get(url, "/api/v1/alerts") or {}
    return [
        a for a in body.get("data", {}).get("alerts", [])
        if a["labels"].get("alertname") == "MeshwardDeniedFlowSpike"
    ]  # fmt: skip


def test_a_denied_flow_spike_fires_the_alert(mesh: Mesh, prometheus: str) -> None:
    wait(lambda: get(prometheus, "/api/v1/query?query=up")["data"]["result"], 20, "a scrape")
    targets = get(prometheus, "/api/v1/targets")["data"]["activeTargets"]
    assert [t["health"] for t in targets] == ["up"], targets
    # One denial first: the series exists before the burst, so rate() sees the burst as growth.
    assert mesh.request(FRONTEND, ORDERS, "/orders/1", method="POST")[0] == 403
    query = '/api/v1/query?query=meshward_flows_total{decision="deny"}'
    wait(lambda: get(prometheus, query)["data"]["result"], 20, "the denied flow scraped")
    assert spike_alerts(prometheus) == []  # one denial is no spike
    for i in range(40):
        assert mesh.request(FRONTEND, ORDERS, f"/orders/{i}", method="POST")[0] == 403
    firing = wait(
        lambda: [a for a in spike_alerts(prometheus) if a["state"] == "firing"], 25, "firing"
    )
    [alert] = firing
    assert alert["labels"]["source"] == FRONTEND and alert["labels"]["destination"] == ORDERS
    assert alert["labels"]["severity"] == "warning"
    assert alert["annotations"]["summary"] == f"Denied flows spike: {FRONTEND} -> {ORDERS}"
    assert float(alert["value"]) > 1
