"""Realistic mesh topologies for compile and control-plane benchmarks and scale tests.

Two shapes, both deterministic for the same arguments (seeded ``random.Random``):

- :func:`worst_case`: one namespace of N services and one namespace-wide ALLOW whose source is
  the namespace itself, so every sidecar may call every other and gets an outbound listener,
  cluster, route and endpoints for each: output grows with N squared whatever compile does.
- :func:`fleet`: how real fleets look. N services in namespaces of a few dozen; each service
  has an ALLOW policy naming about ten callers by principal (some from other namespaces), and
  every namespace has namespace-wide rules (an ALLOW from a monitoring identity, a DENY on
  ``/admin`` for callers outside the namespace, an ALLOW of read-only calls from the same
  namespace), so each sidecar reaches the services of its namespace plus the few in other
  namespaces that name it.

The old convergence benchmark's topology (a few services with many replicas sharing snapshots)
hid the cost of distinct services; these give every service its own identity and policies.

And the small shop the integration tests run as real meshes, as the policy YAML an operator
writes: :func:`shop_yaml` (mesh config, STRICT mTLS, workloads) plus :func:`allow_yaml` rules.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    MeshConfig,
    Operation,
    Protocol,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.policy.policyset import PolicySet

TRUST_DOMAIN = "cluster.local"
HTTP_PORT = 8080
MONITOR_NAMESPACE = "monitoring"
MONITOR = "prometheus"


def service_name(i: int) -> str:
    return f"svc{i:04d}"


def _workload(namespace: str, name: str, *, tcp: bool = False) -> Workload:
    ports = [WorkloadPort("http", HTTP_PORT, Protocol.HTTP)]
    if tcp:
        ports.append(WorkloadPort("tcp", 7000, Protocol.TCP))
    return Workload(
        namespace=namespace,
        name=name,
        labels={"app": name},
        service_account=name,
        ports=tuple(ports),
    )


def principal(namespace: str, name: str) -> str:
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{name}"


def worst_case(services: int, *, namespace: str = "mesh") -> PolicySet:
    """One namespace, ``services`` distinct services, one namespace-wide ALLOW from the
    namespace: every sidecar may call every other service."""
    workloads = [_workload(namespace, service_name(i)) for i in range(services)]
    allow = AuthorizationPolicy(
        namespace=namespace,
        name="allow-namespace",
        action=Action.ALLOW,
        selector=None,
        rules=(Rule(sources=(Source(namespaces=(namespace,)),)),),
    )
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TRUST_DOMAIN),
        workloads=workloads,
        authorization_policies=[allow],
    )


@dataclass(frozen=True)
class FleetShape:
    services: int
    namespace_size: int = 30  # services per namespace
    callers: int = 10  # callers named by principal per service
    cross_namespace: float = 0.3  # share of named callers from another namespace
    seed: int = 14


def namespace_of(i: int, shape: FleetShape) -> str:
    return f"team{i // shape.namespace_size:03d}"


def fleet(shape: FleetShape | int) -> PolicySet:
    """N services in namespaces of ``namespace_size``; each callable by ``callers`` others named
    by principal; per namespace an ALLOW for the monitoring identity, an ALLOW of GETs from the
    same namespace and a DENY on /admin from other namespaces. A monitoring workload scrapes
    everyone."""
    if isinstance(shape, int):
        shape = FleetShape(services=shape)
    rng = random.Random(shape.seed)
    n = shape.services
    refs = [(namespace_of(i, shape), service_name(i)) for i in range(n)]
    workloads = [_workload(ns, name) for ns, name in refs]
    workloads.append(_workload(MONITOR_NAMESPACE, MONITOR))
    policies: list[AuthorizationPolicy] = []
    for i, (ns, name) in enumerate(refs):
        same = [j for j in range(n) if refs[j][0] == ns and j != i]
        callers: set[int] = set()
        while len(callers) < min(shape.callers, n - 1):
            pool = same if same and rng.random() >= shape.cross_namespace else range(n)
            j = rng.choice(list(pool))
            if j != i:
                callers.add(j)
        policies.append(
            AuthorizationPolicy(
                namespace=ns,
                name=f"{name}-callers",
                action=Action.ALLOW,
                selector={"app": name},
                rules=(
                    Rule(
                        sources=(
                            Source(principals=tuple(principal(*refs[j]) for j in sorted(callers))),
                        ),
                        operations=(Operation(methods=("GET", "POST")),),
                    ),
                ),
            )
        )
    for ns in sorted({ns for ns, _ in refs}):
        policies.append(
            AuthorizationPolicy(
                namespace=ns,
                name="allow-monitoring",
                action=Action.ALLOW,
                selector=None,
                rules=(
                    Rule(
                        sources=(Source(principals=(principal(MONITOR_NAMESPACE, MONITOR),)),),
                        operations=(Operation(methods=("GET",), paths=("/metrics",)),),
                    ),
                ),
            )
        )
        policies.append(
            AuthorizationPolicy(
                namespace=ns,
                name="allow-same-namespace",
                action=Action.ALLOW,
                selector=None,
                rules=(
                    Rule(
                        sources=(Source(namespaces=(ns,)),),
                        operations=(Operation(methods=("GET",), paths=("/healthz", "/api/*")),),
                    ),
                ),
            )
        )
        policies.append(
            AuthorizationPolicy(
                namespace=ns,
                name="deny-admin-from-outside",
                action=Action.DENY,
                selector=None,
                rules=(
                    Rule(
                        sources=(Source(not_namespaces=(ns,)),),
                        operations=(Operation(paths=("/admin", "/admin/*")),),
                    ),
                ),
            )
        )
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TRUST_DOMAIN),
        workloads=workloads,
        authorization_policies=policies,
    )


# -- the small shop of the integration tests, as policy YAML ------------------------------------------
SHOP = "shop"


def workload_doc(name: str, *, protocol: str = "HTTP", port: int = HTTP_PORT) -> dict[str, Any]:
    """A shop Workload labelled ``app: <name>`` with one port."""
    return {
        "apiVersion": "meshward.dev/v1",
        "kind": "Workload",
        "metadata": {"name": name, "namespace": SHOP, "labels": {"app": name}},
        "spec": {"ports": [{"name": protocol.lower(), "port": port, "protocol": protocol}]},
    }


def workloads_yaml(names: Iterable[str]) -> str:
    """A shop Workload for each name (:func:`workload_doc`), each document starting with
    ``---``: appended to another policy file's text, or a file of its own."""
    return yaml.safe_dump_all(
        [workload_doc(name) for name in names], explicit_start=True, sort_keys=False
    )


def allow_doc(
    name: str,
    app: str,
    *,
    callers: Sequence[str] = (),
    methods: Sequence[str] = (),
    paths: Sequence[str] = (),
) -> dict[str, Any]:
    """An ALLOW AuthorizationPolicy on the shop's ``app``: one rule, from the shop workloads
    named in ``callers`` (by principal) to ``methods``/``paths`` (each left out when empty)."""
    rule: dict[str, Any] = {}
    if callers:
        rule["from"] = [{"source": {"principals": [principal(SHOP, c) for c in callers]}}]
    operation = {k: list(v) for k, v in (("methods", methods), ("paths", paths)) if v}
    if operation:
        rule["to"] = [{"operation": operation}]
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": SHOP},
        "spec": {"selector": {"matchLabels": {"app": app}}, "action": "ALLOW", "rules": [rule]},
    }


def allow_yaml(name: str, app: str, **rule: Any) -> str:
    """:func:`allow_doc` as a policy file."""
    return yaml.safe_dump(allow_doc(name, app, **rule), sort_keys=False)


def shop_yaml(
    workloads: Iterable[str | dict[str, Any]],
    *policies: dict[str, Any],
    mtls: str | None = "STRICT",
    mesh: Mapping[str, Any] | None = None,
) -> str:
    """One policy file: the MeshConfig (trust domain cluster.local, root namespace
    meshward-system, plus ``mesh``'s keys, e.g. ``{"jwtEnforcement": "extauthz"}``), a
    mesh-wide PeerAuthentication named and set ``mtls`` (none if None), a shop Workload for each
    name (HTTP on 8080; or a :func:`workload_doc`) and ``policies`` (:func:`allow_doc`). The
    tests' policy files start from it, so the common part is written once."""
    spec = {"trustDomain": TRUST_DOMAIN, "rootNamespace": "meshward-system", **(mesh or {})}
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "meshward.dev/v1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh"},
            "spec": spec,
        }
    ]
    if mtls is not None:
        docs.append(
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": mtls.lower(), "namespace": "meshward-system"},
                "spec": {"mtls": {"mode": mtls}},
            }
        )
    docs += [workload_doc(w) if isinstance(w, str) else w for w in workloads]
    docs += policies
    return yaml.safe_dump_all(docs, sort_keys=False)
