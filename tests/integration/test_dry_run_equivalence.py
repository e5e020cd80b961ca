"""Dry-run equivalence: the would-deny verdict a real Envoy records for each request (the dry-run
ALLOW filter's ``shadow_engine_result`` in the access log, which the flows records are built
from) is the one meshward.policy.evaluate gives (``dry_run[...].would_deny``).

The bug this pins: a dry-run ALLOW policy without rules (allow-nothing) compiled to no shadow
engine at all, so Envoy logged "no policy" and no would-deny while the evaluator (and
``policy explain``) said every request would be denied. Istio compiles it to shadow ALLOW rules
with no policies, which Envoy evaluates as "shadow denied" for everything; so does Meshward now,
on HTTP and TCP ports, for dry-run policies and for every policy of an audit-mode namespace.
Enforced ALLOW rules stay in the dry-run ALLOW engine, so a request they allow is not reported
as one the dry-run policy would deny (the evaluator's semantics).
"""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from meshward.certs.ca import CertificateAuthority
from meshward.compile import CompileOptions
from meshward.compile.names import DRY_RUN_ALLOW_PREFIX
from meshward.flows.evidence import verdict_from_access_log
from meshward.policy import PolicySet, Request, evaluate
from meshward.policy.explain import explain
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    MeshConfig,
    MtlsMode,
    PeerAuthentication,
    Rule,
    Source,
)
from meshward.testing import synth
from meshward.testing.echo import EchoServer
from meshward.testing.sidecar import (
    SidecarConnection,
    StaticSidecar,
    client_context,
    wait_for_access_log,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
RESULT = DRY_RUN_ALLOW_PREFIX + "shadow_engine_result"
PROBES = 60


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral(synth.TRUST_DOMAIN)


@pytest.fixture(scope="module")
def app() -> Iterator[EchoServer]:
    with EchoServer("api") as server:
        yield server


@pytest.fixture(scope="module")
def contexts(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], ssl.SSLContext]:
    directory = tmp_path_factory.mktemp("clients")
    return {
        identity: client_context(ca, synth.spiffe(*identity), directory)
        for identity in synth.IDENTITIES
        if identity is not None
    }


def _allow_nothing(*, dry_run: bool) -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace=synth.TARGET_NAMESPACE,
        name="allow-nothing",
        selector={"app": synth.TARGET_NAME},
        dry_run=dry_run,
    )


def _allow_shop() -> AuthorizationPolicy:
    return AuthorizationPolicy(
        namespace=synth.TARGET_NAMESPACE,
        name="allow-shop",
        selector={"app": synth.TARGET_NAME},
        rules=(Rule(sources=(Source(namespaces=("shop",)),)),),
    )


# name -> (policies, namespaces in audit mode)
CASES: dict[str, tuple[list[AuthorizationPolicy], frozenset[str]]] = {
    # the bug: a dry-run allow-nothing alone (every request allowed, every one would be denied)
    "dry-run-allow-nothing": ([_allow_nothing(dry_run=True)], frozenset()),
    # beside an enforced ALLOW: what it allows is not a would-deny, the rest is denied anyway
    "dry-run-allow-nothing+enforced-allow": (
        [_allow_nothing(dry_run=True), _allow_shop()],
        frozenset(),
    ),
    # an enforced allow-nothing in an audit-mode namespace acts as a dry-run one
    "audit-namespace-allow-nothing": (
        [_allow_nothing(dry_run=False)],
        frozenset({synth.TARGET_NAMESPACE}),
    ),
}


def _policy_set(case: str) -> PolicySet:
    policies, audit = CASES[case]
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=synth.TRUST_DOMAIN, audit_namespaces=audit),
        workloads=synth.target_workloads(tcp=True),
        authorization_policies=policies,
        # PERMISSIVE: plaintext requests reach the (plaintext chain's) dry-run filter too
        peer_authentications=[
            PeerAuthentication(
                namespace=synth.TARGET_NAMESPACE, name="default", mode=MtlsMode.PERMISSIVE
            )
        ],
    )


def _evaluator_would_deny(policy_set: PolicySet, request: Request) -> bool | None:
    """Would the dry-run ALLOW policies deny it (None: no dry-run verdict at all, e.g. a path
    rejected before authorization)? One shadow engine holds every dry-run ALLOW rule, so it
    reports a denial when each of them would deny."""
    workload = policy_set.workload(synth.TARGET_REF)
    assert workload is not None
    decision = evaluate(policy_set, workload, request, now=NOW)
    allows = [r for r in decision.dry_run if r.action is Action.ALLOW]
    if not allows:
        return None
    return all(r.would_deny for r in allows)


def _envoy_would_deny(entry: dict[str, Any]) -> bool | None:
    rbac = entry.get("rbac")
    if not isinstance(rbac, dict) or RESULT not in rbac:
        return None
    return bool(rbac[RESULT] == "denied")


def _tcp_connect(port: int, context: ssl.SSLContext) -> bool:
    """Did bytes make it to the app and back through the TCP proxy?"""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = tls.recv(64)
                while tls.recv(4096):
                    pass
        except (ConnectionResetError, OSError):
            return False
    return data.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_would_deny_exactly_where_the_evaluator_does(
    case: str,
    ca: CertificateAuthority,
    app: EchoServer,
    contexts: dict[tuple[str, str], ssl.SSLContext],
    tmp_path: Path,
) -> None:
    policy_set = _policy_set(case)
    workload = policy_set.workload(synth.TARGET_REF)
    assert workload is not None
    probes = synth.random_probes(31, PROBES)
    ports = {p.port: app.port for p in workload.ports}
    log = tmp_path / "access.log"
    options = CompileOptions(access_log_path=str(log))
    mismatches: list[str] = []
    statuses: Counter[int] = Counter()
    verdicts: Counter[bool | None] = Counter()
    connections: dict[tuple[Any, ...], SidecarConnection] = {}
    with StaticSidecar(
        policy_set, synth.TARGET_REF, ca, ports, options=options, workdir=tmp_path
    ) as sidecar:
        for probe in probes:
            key = (probe.port, probe.identity, probe.sni)
            conn = connections.get(key)
            if conn is None:
                context = contexts[probe.identity] if probe.identity else None
                conn = SidecarConnection(sidecar.port(probe.port), context, sni=probe.sni)
                connections[key] = conn
            status, _, _ = conn.fetch(probe.method, probe.path, probe.wire_headers())
            statuses[status] += 1
            want = synth.expected_status(policy_set, probe, now=NOW)
            if status != want:
                mismatches.append(f"{probe}: envoy {status}, evaluator {want}")
        for conn in connections.values():
            conn.close()
        tcp = {
            identity: _tcp_connect(sidecar.port(synth.TCP_PORT), contexts[identity])
            for identity in (("shop", "web"), ("ops", "admin"))
        }
        entries = wait_for_access_log(log, len(probes) + len(tcp))
    http_entries = [e for e in entries if "response_code" in e]
    tcp_entries = [e for e in entries if "response_code" not in e]
    assert len(http_entries) == len(probes) and len(tcp_entries) == len(tcp)
    for probe, entry in zip(probes, http_entries, strict=True):
        assert entry["method"] == probe.method, (entry, probe)  # (the path is normalized)
        want = _evaluator_would_deny(policy_set, probe.request())
        got = _envoy_would_deny(entry)
        verdicts[got] += 1
        if got != want:
            mismatches.append(
                f"{probe}: envoy would_deny={got}, evaluator {want} ({entry['rbac']})"
            )
        # policy explain says the same (it is what the bug report was read from)
        said = explain(policy_set, workload, probe.request(), now=NOW)
        explained = [r for r in said.decision.dry_run if r.action is Action.ALLOW]
        if want is not None and all(r.would_deny for r in explained) != want:
            mismatches.append(f"{probe}: policy explain disagrees with evaluate")
        # the flows record built from this log line names the dry-run ALLOW as would-deny
        verdict = verdict_from_access_log(entry)
        assert verdict is not None
        if bool(want) != ("(dry-run ALLOW)" in verdict.would_deny):
            mismatches.append(f"{probe}: flows would_deny {verdict.would_deny}, evaluator {want}")
    for entry in tcp_entries:
        principal = entry["peer_principal"]
        request = Request(
            destination_port=synth.TCP_PORT,
            source_principal=principal,
            source_ip="127.0.0.1",
            destination_ip="127.0.0.1",
        )
        identity = tuple(principal.split("/ns/")[1].split("/sa/"))
        want_allowed = evaluate(policy_set, workload, request, now=NOW).allowed
        if tcp[identity] != want_allowed:  # type: ignore[index]
            mismatches.append(f"TCP {principal}: envoy {tcp[identity]}, evaluator {want_allowed}")  # type: ignore[index]
        want = _evaluator_would_deny(policy_set, request)
        got = _envoy_would_deny(entry)
        if got != want:
            mismatches.append(
                f"TCP {principal}: envoy would_deny={got}, evaluator {want} ({entry})"
            )
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:8])
    # every request that reached authorization got a verdict, and the bug's verdict is there
    assert verdicts[True] > 0, verdicts
    assert statuses[200] > 0, statuses
    if case.endswith("enforced-allow"):
        assert verdicts[False] > 0 and statuses[403] > 0, (verdicts, statuses)
        assert tcp == {("shop", "web"): True, ("ops", "admin"): False}
    else:
        assert verdicts[False] == 0 and statuses[403] == 0, (verdicts, statuses)
        assert tcp == {("shop", "web"): True, ("ops", "admin"): True}
