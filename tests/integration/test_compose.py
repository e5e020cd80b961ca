"""docker-compose.yml without a Docker engine: the file is valid (`docker-compose config`),
everything it mounts exists (or is made at run time by a one-shot service it waits for), every
sidecar is a `meshward agent` whose command is the generated one, the generated bindings and
tour state match the policies, and the config the compose control plane would
serve is accepted by `envoy --mode validate`."""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.certs.ca import CertificateAuthority
from meshward.compile import CompileOptions, Endpoint, Mode, compile_workload, static_bootstrap
from meshward.compile.names import extauthz_spiffe_id
from meshward.compile.workload import to_dict
from meshward.demo import compose
from meshward.envoy.process import validate_config
from meshward.policy import load
from meshward.testing.sidecar import workload_secrets
from meshward.xds.cli import load_bindings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def policy() -> Any:
    return load([ROOT / "examples"])


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The file as docker-compose itself resolves it (anchors merged, paths absolute)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; `make tools`)")
    proc = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = yaml.safe_load(proc.stdout)
    return data


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of every bind mount of a service."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") != "bind":
                continue
            mounts.append((Path(volume["source"]), volume["target"], bool(volume.get("read_only"))))
            continue
        source, target, *mode = str(volume).split(":")
        if source.startswith(("/", ".")):
            mounts.append((Path(source), target, mode == ["ro"]))
    return mounts


def _one_shot_dependencies(config: dict[str, Any], name: str) -> set[str]:
    depends = config["services"][name].get("depends_on", {})
    if isinstance(depends, list):
        return set()
    return {d for d, c in depends.items() if c.get("condition") == "service_completed_successfully"}


def test_every_mounted_path_exists_or_is_made_first(config: dict[str, Any]) -> None:
    """A host path may be missing only under certs/ (generated PKI, not in git), and then a
    one-shot service the mounting service waits for must mount a parent of it read-write."""
    checked = 0
    for name, service in config["services"].items():
        for source, _target, _ in _bind_mounts(service):
            checked += 1
            if source.exists():
                continue
            assert source.is_relative_to(ROOT / "certs"), f"{name}: {source} does not exist"
            makers = [
                dep
                for dep in _one_shot_dependencies(config, name)
                for parent, _, read_only in _bind_mounts(config["services"][dep])
                if not read_only and source.is_relative_to(parent)
            ]
            assert makers, f"{name}: {source} is made by no one-shot service it depends on"
    assert checked >= 11  # ca, credentials, xds (2), extauthz, 5 sidecars (join), tour


def test_no_stale_bootstraps_are_left(policy: Any) -> None:
    """The agents render their Envoy bootstraps: none is committed any more."""
    assert not list((ROOT / "sidecar-config").rglob("envoy.json"))


def test_generated_files_match_the_policies(policy: Any) -> None:
    for name, text in compose.render(policy).items():
        assert (ROOT / "sidecar-config" / name).read_text() == text, (
            f"sidecar-config/{name} is stale: run `python -m meshward.demo.compose`"
        )


def test_services_agree_with_the_generated_files(config: dict[str, Any], policy: Any) -> None:
    services = config["services"]
    refs = sorted(w.ref for w in policy.workloads)
    ips = compose.app_ips(refs)

    def ip(name: str) -> str:
        return str(services[name]["networks"]["mesh"]["ipv4_address"])

    assert ip("jaeger") == compose.JAEGER_IP and ip("xds") == compose.XDS_IP
    assert ip("extauthz") == compose.EXTAUTHZ_IP
    subnet = config["networks"]["mesh"]["ipam"]["config"][0]["subnet"]
    assert subnet == compose.NETWORK
    xds_args = services["xds"]["command"]
    assert f"--extauthz={compose.EXTAUTHZ_IP}:{compose.EXTAUTHZ_PORT}" in xds_args
    assert f"--otlp={compose.JAEGER_IP}:4317" in xds_args
    assert f"--access-log={compose.ACCESS_LOG}" in xds_args
    assert f"--admin=0.0.0.0:{compose.XDS_ADMIN_PORT}" in xds_args
    assert f"--decision-log={compose.DECISION_LOG}" in services["extauthz"]["command"]
    assert f"--tls-dir={compose.EXTAUTHZ_TLS_DIR}" in services["extauthz"]["command"]
    credentials = " ".join(services["credentials"]["command"])
    # ext_authz's SVID is the identity the compiled sidecars pin (issue 13: mTLS to ext_authz).
    assert f"--spiffe-id {extauthz_spiffe_id(policy.mesh)}" in credentials
    assert any(
        target == compose.EXTAUTHZ_TLS_DIR for _, target, _ in _bind_mounts(services["extauthz"])
    )
    assert f"--join-listen=0.0.0.0:{compose.JOIN.split(':')[1]}" in xds_args
    assert not any(a.startswith("--secrets") for a in xds_args)  # agent-held keys: the only mode
    assert "meshward ca join-token" in credentials
    assert all(ref.split("/")[1] in credentials for ref in refs)
    dockerfile = (ROOT / "Dockerfile").read_text()
    envoy_version = subprocess.run(
        [str(_envoy()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    image = next(
        line.split()[1] for line in dockerfile.splitlines() if "COPY --from=envoyproxy" in line
    )
    image_version = image.split("=", 1)[1].rsplit(":v", 1)[1]
    assert f"/{image_version}/" in envoy_version, "the image's Envoy is the Envoy we test with"
    for ref in refs:
        name = ref.split("/")[1]
        assert ip(name) == ips[ref]
        assert services[name]["command"][-1] == str(compose.APP_PORT)
        sidecar = services[f"{name}-sidecar"]
        assert sidecar["network_mode"] == f"service:{name}"
        assert sidecar["command"] == compose.agent_argv(ref)
        mounts = {target: source for source, target, _ in _bind_mounts(sidecar)}
        assert mounts[compose.JOIN_DIR] == ROOT / "certs" / "join"
        targets = [v["target"] if isinstance(v, dict) else str(v).split(":")[1]
                   for v in sidecar["volumes"]]  # fmt: skip
        assert compose.AGENT_DIR in targets  # its key and SVID survive a container restart
    tour = services["tour"]
    tour_mounts = {target for _, target, _ in _bind_mounts(tour)}
    volumes = {
        str(v).split(":")[1] if not isinstance(v, dict) else v["target"] for v in tour["volumes"]
    }
    state = json.loads((ROOT / "sidecar-config" / "tour.json").read_text())
    assert "/etc/meshward/tour.json" in tour_mounts
    assert state["policy_dir"] in volumes and "/logs/extauthz" in volumes
    for w in state["workloads"].values():
        assert str(Path(w["access_log"]).parent) in volumes


def _envoy() -> Path:
    from meshward.envoy import find_envoy

    return find_envoy()


def test_the_compose_control_plane_serves_valid_envoy_config(policy: Any) -> None:
    """Each sidecar's config as `xds serve --bindings sidecar-config/bindings.json` compiles it
    (in static form, with secrets inline), through `envoy --mode validate`."""
    bindings = load_bindings(ROOT / "sidecar-config" / "bindings.json")
    options = CompileOptions(
        mode=Mode.STATIC,
        bindings=bindings,
        extauthz=Endpoint(compose.EXTAUTHZ_IP, compose.EXTAUTHZ_PORT),
        otlp=Endpoint(compose.JAEGER_IP, 4317),
        access_log_path="/dev/null",  # compose: /var/log/meshward/access.log in the container
    )
    ca = CertificateAuthority.ephemeral(policy.mesh.trust_domain)

    def validate(workload: Any) -> tuple[str, bool, str]:
        config = static_bootstrap(compile_workload(policy, workload.ref, replace(options)))
        secrets = workload_secrets(ca, workload.spiffe_id(policy.mesh.trust_domain))
        config["static_resources"]["secrets"] = [to_dict(s) for s in secrets]
        ok, output = validate_config(config)
        return workload.ref, ok, output[-2000:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(validate, sorted(policy.workloads, key=lambda w: w.ref)))
    for ref, ok, output in results:
        assert ok, f"{ref}: {output}"


def test_prometheus_and_grafana_see_the_mesh_and_the_host_reaches_the_admin_address(
    config: dict[str, Any],
) -> None:
    """Prometheus scrapes the control plane's admin port and ext_authz's metrics with the alert
    rules loaded; Grafana gets the datasource and the three dashboards; the admin port is
    published on the host's loopback only, so `meshward status/flows/denials --xds` work there."""
    services = config["services"]
    assert _ports(services["xds"]) == [
        ("127.0.0.1", compose.XDS_ADMIN_PORT, compose.XDS_ADMIN_PORT)
    ]
    prom_mounts = {t: s for s, t, _ in _bind_mounts(services["prometheus"])}
    prom_config = yaml.safe_load(prom_mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert prom_mounts["/etc/prometheus/alerts.yml"] == ROOT / "deploy/prometheus/alerts.yml"
    assert prom_config["rule_files"] == ["alerts.yml"]
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"]
        for job in prom_config["scrape_configs"]
    }  # fmt: skip
    assert targets["meshward-control-plane"] == [f"xds:{compose.XDS_ADMIN_PORT}"]
    assert targets["meshward-extauthz"] == [f"extauthz:{compose.EXTAUTHZ_METRICS_PORT}"]
    assert (
        f"--metrics-listen=0.0.0.0:{compose.EXTAUTHZ_METRICS_PORT}"
        in services["extauthz"]["command"]
    )
    graf = {t: s for s, t, _ in _bind_mounts(services["grafana"])}
    provider = yaml.safe_load(
        (graf["/etc/grafana/provisioning"] / "dashboards/meshward.yaml").read_text()
    )
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert graf[dashboards_dir] == ROOT / "deploy/grafana/dashboards"
    assert len(list(graf[dashboards_dir].glob("meshward-*.json"))) == 3
    datasource = yaml.safe_load(
        (graf["/etc/grafana/provisioning"] / "datasources/prometheus.yaml").read_text()
    )["datasources"][0]
    board = json.loads((graf[dashboards_dir] / "meshward-oncall.json").read_text())
    assert board["panels"][0]["datasource"]["uid"] == datasource["uid"]
    assert datasource["url"] == "http://prometheus:9090"
    for name in ("prometheus", "grafana"):
        assert all(host == "127.0.0.1" for host, _, _ in _ports(services[name]))
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "config", str(prom_mounts["/etc/prometheus/prometheus.yml"])],
                               capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr


def _ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, published, target) of each published port, in either syntax docker-compose
    prints (v1: "IP:PUBLISHED:TARGET/tcp" strings; v2: mappings)."""
    result = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            result.append((port.get("host_ip", ""), int(port["published"]), int(port["target"])))
        else:
            host, published, target = str(port).split("/")[0].rsplit(":", 2)
            result.append((host, int(published), int(target)))
    return result
