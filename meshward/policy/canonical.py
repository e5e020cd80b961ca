"""The canonical form of a policy set: one document per object, defaults filled in, objects
sorted, unknown annotations and Kubernetes bookkeeping dropped. Its SHA-256 is the version, so
every control-plane replica computes the same version for the same policy whatever the key
order, whitespace or file split; and `dump` writes it back as loadable YAML."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import yaml

from meshward.policy.model import (
    DRY_RUN_ANNOTATION,
    EXPIRES_AT_ANNOTATION,
    Action,
    AuthorizationPolicy,
    Condition,
    DenialDetails,
    JwtEnforcement,
    JwtRule,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    RequestAuthentication,
    Rule,
    Source,
    Workload,
)
from meshward.policy.vocabulary import OPERATION_FORMS, SOURCE_FORMS

FORMAT = "meshward.policy/v1"
ISTIO_API = "security.istio.io/v1"
MESHWARD_API = "meshward.dev/v1"


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in sorted(labels)}


def _selector(selector: Mapping[str, str] | None) -> dict[str, Any]:
    return {"selector": {"matchLabels": _labels(selector)}} if selector else {}


def mesh_document(mesh: MeshConfig) -> dict[str, Any]:
    spec: dict[str, Any] = {"trustDomain": mesh.trust_domain, "rootNamespace": mesh.root_namespace}
    if mesh.denial_details is not DenialDetails.QUIET:  # the default leaves versions unchanged
        spec["denialDetails"] = mesh.denial_details.value
    if mesh.jwt_enforcement is not JwtEnforcement.NATIVE:  # the default leaves versions unchanged
        spec["jwtEnforcement"] = mesh.jwt_enforcement.value
    if mesh.audit_namespaces:  # none (the default) leaves versions unchanged
        spec["enforcement"] = {"namespaces": {ns: "audit" for ns in sorted(mesh.audit_namespaces)}}
    return {
        "apiVersion": MESHWARD_API,
        "kind": "MeshConfig",
        "metadata": {"name": "mesh"},
        "spec": spec,
    }


def workload_document(workload: Workload) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": workload.name, "namespace": workload.namespace}
    if workload.labels:
        metadata["labels"] = _labels(workload.labels)
    spec: dict[str, Any] = {
        "serviceAccount": workload.service_account or workload.name,
        "address": workload.address,
    }
    if workload.ports:
        spec["ports"] = [
            {"name": p.name, "port": p.port, "protocol": p.protocol.value} for p in workload.ports
        ]
    return {"apiVersion": MESHWARD_API, "kind": "Workload", "metadata": metadata, "spec": spec}


def _source(source: Source) -> dict[str, Any]:
    return {f.key: list(getattr(source, f.attr)) for f in SOURCE_FORMS if getattr(source, f.attr)}


def _operation(operation: Operation) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in OPERATION_FORMS:
        values = getattr(operation, f.attr)
        if values:
            out[f.key] = [str(v) for v in values]
    return out


def _condition(condition: Condition) -> dict[str, Any]:
    out: dict[str, Any] = {"key": condition.key}
    if condition.values:
        out["values"] = list(condition.values)
    if condition.not_values:
        out["notValues"] = list(condition.not_values)
    return out


def rule_document(rule: Rule) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.sources:
        out["from"] = [{"source": _source(s)} for s in rule.sources]
    if rule.operations:
        out["to"] = [{"operation": _operation(o)} for o in rule.operations]
    if rule.conditions:
        out["when"] = [_condition(c) for c in rule.conditions]
    return out


def authorization_policy_document(policy: AuthorizationPolicy) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": policy.name, "namespace": policy.namespace}
    annotations: dict[str, str] = {}
    if policy.dry_run:
        annotations[DRY_RUN_ANNOTATION] = "true"
    if policy.expires_at is not None:
        annotations[EXPIRES_AT_ANNOTATION] = format_time(policy.expires_at)
    if annotations:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {**_selector(policy.selector), "action": policy.action.value}
    if policy.action is Action.CUSTOM and policy.provider is not None:
        spec["provider"] = {"name": policy.provider}
    if policy.rules:
        spec["rules"] = [rule_document(r) for r in policy.rules]
    return {
        "apiVersion": ISTIO_API,
        "kind": "AuthorizationPolicy",
        "metadata": metadata,
        "spec": spec,
    }


def peer_authentication_document(peer: PeerAuthentication) -> dict[str, Any]:
    spec: dict[str, Any] = _selector(peer.selector)
    if peer.mode is not MtlsMode.UNSET:
        spec["mtls"] = {"mode": peer.mode.value}
    if peer.port_level:
        spec["portLevelMtls"] = {
            str(port): ({"mode": mode.value} if mode is not MtlsMode.UNSET else {})
            for port, mode in sorted(peer.port_level.items())
        }
    return {
        "apiVersion": ISTIO_API,
        "kind": "PeerAuthentication",
        "metadata": {"name": peer.name, "namespace": peer.namespace},
        "spec": spec,
    }


def _jwt_rule(rule: JwtRule) -> dict[str, Any]:
    out: dict[str, Any] = {"issuer": rule.issuer}
    if rule.audiences:
        out["audiences"] = list(rule.audiences)
    if rule.jwks_uri is not None:
        out["jwksUri"] = rule.jwks_uri
    if rule.jwks is not None:
        out["jwks"] = rule.jwks
    if rule.from_headers:
        out["fromHeaders"] = [
            {"name": h.name, **({"prefix": h.prefix} if h.prefix else {})}
            for h in rule.from_headers
        ]
    if rule.from_params:
        out["fromParams"] = list(rule.from_params)
    if rule.output_payload_to_header is not None:
        out["outputPayloadToHeader"] = rule.output_payload_to_header
    if rule.forward_original_token:
        out["forwardOriginalToken"] = True
    return out


def request_authentication_document(request: RequestAuthentication) -> dict[str, Any]:
    spec: dict[str, Any] = _selector(request.selector)
    if request.jwt_rules:
        spec["jwtRules"] = [_jwt_rule(r) for r in request.jwt_rules]
    return {
        "apiVersion": ISTIO_API,
        "kind": "RequestAuthentication",
        "metadata": {"name": request.name, "namespace": request.namespace},
        "spec": spec,
    }


def documents(
    mesh: MeshConfig,
    workloads: Iterable[Workload],
    authorization_policies: Iterable[AuthorizationPolicy],
    peer_authentications: Iterable[PeerAuthentication],
    request_authentications: Iterable[RequestAuthentication],
) -> list[dict[str, Any]]:
    """Canonical documents, in canonical order (objects sorted by namespace then name)."""

    def key(item: Any) -> tuple[str, str]:
        return (item.namespace, item.name)

    return [
        mesh_document(mesh),
        *(workload_document(w) for w in sorted(workloads, key=key)),
        *(authorization_policy_document(p) for p in sorted(authorization_policies, key=key)),
        *(peer_authentication_document(p) for p in sorted(peer_authentications, key=key)),
        *(request_authentication_document(r) for r in sorted(request_authentications, key=key)),
    ]


def canonical_bytes(docs: list[dict[str, Any]]) -> bytes:
    payload = {"format": FORMAT, "documents": docs}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def version_of(docs: list[dict[str, Any]]) -> str:
    return hashlib.sha256(canonical_bytes(docs)).hexdigest()


#: libyaml's emitter where PyYAML has it: the same text as PyYAML's own (checked over the fleet
#: topology's 1 MB), ~4.5x faster (1.39 -> 0.31 s for 1,000 services; the control plane's
#: history writes every applied set)
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def dump_documents(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML that `parse` reads back to the same version."""
    text: str = yaml.dump_all(
        docs, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, allow_unicode=True
    )
    return text
