"""`meshward extauthz serve --workers 2`: two processes share one port (SO_REUSEPORT), both
answer, /metrics sums them, and a worker that dies is replaced."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

from meshward.certs.ca import CertificateAuthority
from meshward.extauthz.client import build_check_request, check_once
from meshward.policy import load
from meshward.testing.extauthz import issue_service_tls, issue_tls
from meshward.testing.processes import Launcher, meshward_argv

POLICY = """\
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin}}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public, namespace: foo}
spec:
  rules: [{to: [{operation: {paths: ["/public*"]}}]}]
"""


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _check(port: int, path: str, client_tls: Path) -> int:
    """One Check over mTLS as foo/httpbin's sidecar, on a fresh connection (so the kernel may
    pick either worker)."""
    key, chain, roots = (
        (client_tls / n).read_bytes() for n in ("key.pem", "cert-chain.pem", "root-cert.pem")
    )
    response = check_once(
        "127.0.0.1",
        port,
        build_check_request(path=path, workload="foo/httpbin"),
        cert_chain_pem=chain,
        key_pem=key,
        roots_pem=roots,
        server_id="spiffe://cluster.local/ns/meshward-system/sa/meshward-extauthz",
    )
    return int(response.status.code)


def _worker_pids(parent: int) -> set[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    pids = {int(p) for p in children.read_text().split()} if children.exists() else set()
    # The spawn context adds a resource tracker; workers are the ones running our entry point.
    return {
        p
        for p in pids
        if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes() and _is_worker(p)
    }


def _is_worker(pid: int) -> bool:
    try:
        return b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


def test_two_workers_share_the_port_and_one_is_replaced_when_it_dies(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    ready = tmp_path / "ready.json"
    ca = CertificateAuthority.ephemeral("cluster.local")
    server_tls = issue_service_tls(ca, load([tmp_path / "policy.yaml"]).mesh, tmp_path / "tls")
    client = issue_tls(
        ca, "spiffe://cluster.local/ns/foo/sa/httpbin", tmp_path / "client"
    ).directory
    argv = meshward_argv(
        "extauthz", "serve", "--policy", str(tmp_path), "--listen", "127.0.0.1:0",
        "--tls-dir", str(server_tls.directory), "--workers", "2",
        "--metrics-listen", "127.0.0.1:0", "--ready-file", str(ready), "--log-level", "WARNING",
    )  # fmt: skip
    launcher = Launcher(tmp_path, quiet=True)
    try:
        info = launcher.start("extauthz", argv, ready_path=ready, timeout=60)
        pid = launcher["extauthz"].pid
        assert pid is not None
        assert info["workers"] == 2
        port = int(info["listen"].rsplit(":", 1)[1])
        metrics_port = int(info["metrics"].rsplit(":", 1)[1])

        codes = [_check(port, "/public/x" if i % 2 else "/private", client) for i in range(20)]
        assert codes == [7, 0] * 10
        deadline = time.monotonic() + 5
        while True:  # workers copy cache counters into the shared files every 0.5 s
            samples = _metrics(metrics_port)
            checks = sum(
                v for k, v in samples.items() if k.startswith("meshward_extauthz_checks_total{")
            )
            versions = [k for k in samples if k.startswith("meshward_extauthz_policy_info{")]
            served = sum(samples[k] for k in versions)
            misses = samples.get("meshward_extauthz_cache_misses_total", 0)
            if checks == 20 and misses >= 2 and served == 2:  # both workers report their version
                break
            assert time.monotonic() < deadline, samples
            time.sleep(0.1)
        assert "meshward_extauthz_cache_hit_ratio" not in samples  # a PromQL job
        assert len(versions) == 1, samples  # one version, served by both workers
        assert not any(k.startswith("meshward_extauthz_policy_id") for k in samples)

        workers = _worker_pids(pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            current = _worker_pids(pid)
            if len(current) == 2 and victim not in current:
                break
            assert time.monotonic() < deadline, f"worker not replaced: {current}"
            time.sleep(0.1)
        assert all(_check(port, "/public/y", client) == 0 for _ in range(10))
        # SIGTERM to the supervisor alone: it stops its workers and exits cleanly
        server = launcher["extauthz"]
        server.signal(signal.SIGTERM)
        assert server.process is not None and server.process.wait(20) == 0
    finally:
        launcher.stop_all()
