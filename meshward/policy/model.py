"""The policy model: what the loader produces and every consumer (evaluator, compiler, ext_authz,
control plane) reads. Frozen dataclasses of tuples, so a PolicySet can be shared across threads
and hashed into a deterministic version without copying.

Conventions every consumer relies on:
- Principals are stored as Istio writes them, without ``spiffe://`` (``cluster.local/ns/x/sa/y``);
  the loader strips ``spiffe://`` and turns ``serviceAccounts`` into principals.
- ``Request.source_principal`` is the peer's full SPIFFE URI (``spiffe://td/ns/x/sa/y``), as
  Envoy reports it; ``None`` on a plaintext connection.
- Empty tuples mean "field not set" (no constraint), never "matches nothing".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_ROOT_NAMESPACE = "meshward-system"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
EXPIRES_AT_ANNOTATION = "meshward.dev/expires-at"


@dataclass(frozen=True)
class Origin:
    """Where a document came from, for error messages and explain output: ``file#index``."""

    file: str
    index: int  # 1-based position of the document in its file

    def __str__(self) -> str:
        return f"{self.file}#{self.index}"


class DenialDetails(StrEnum):
    """What a denied caller is told. QUIET (default): a stable reason code and the trace id,
    nothing about policy names or rules (a caller must not learn the policy by probing);
    operators read the full story in the decision log / ``meshward denials`` by trace id.
    VERBOSE: the deciding policy, rule and reason in the body (development)."""

    QUIET = "quiet"
    VERBOSE = "verbose"


class JwtEnforcement(StrEnum):
    """Who decides end-user JWT rules. NATIVE (default): Envoy's jwt_authn verifies tokens and
    RBAC matches the payload (as Istio does; ~10x cheaper). EXTAUTHZ: the Meshward ext_authz
    service verifies and decides them (the earlier path, kept for comparison)."""

    NATIVE = "native"
    EXTAUTHZ = "extauthz"


class Enforcement(StrEnum):
    """Per namespace (``MeshConfig.spec.enforcement.namespaces``). ENFORCE (default): policies
    act as written. AUDIT: every authorization policy selecting a workload of the namespace acts
    as dry-run (evaluated, logged, compiled to RBAC shadow rules, never denies): "permissive
    first", then enforcement one namespace at a time. CUSTOM policies stay enforced (ext_authz
    has no dry-run, as in Istio); `policy validate` warns about them."""

    ENFORCE = "enforce"
    AUDIT = "audit"


@dataclass(frozen=True)
class MeshConfig:
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    denial_details: DenialDetails = DenialDetails.QUIET
    jwt_enforcement: JwtEnforcement = JwtEnforcement.NATIVE
    audit_namespaces: frozenset[str] = frozenset()  # Enforcement.AUDIT namespaces


class Protocol(StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    TCP = "TCP"


@dataclass(frozen=True)
class WorkloadPort:
    name: str
    port: int
    protocol: Protocol = Protocol.HTTP


@dataclass(frozen=True)
class Workload:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=True)
    service_account: str = ""  # the loader fills the default (the workload's name)
    address: str = "127.0.0.1"
    ports: tuple[WorkloadPort, ...] = ()
    origin: Origin | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def principal(self, trust_domain: str) -> str:
        """Istio's form, as written in policies: ``td/ns/<ns>/sa/<sa>``."""
        return f"{trust_domain}/ns/{self.namespace}/sa/{self.service_account or self.name}"

    def spiffe_id(self, trust_domain: str) -> str:
        return "spiffe://" + self.principal(trust_domain)


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    """A ``when`` entry. ``key`` is kept as written (``request.auth.claims[groups]``)."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    """Fields AND together; items inside a list OR. ``Rule()`` matches every request."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: Action = Action.ALLOW
    # None: every workload in the namespace (the mesh, in the root namespace).
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    rules: tuple[Rule, ...] = ()
    provider: str | None = None  # CUSTOM only
    dry_run: bool = False
    expires_at: datetime | None = None  # timezone-aware, UTC
    origin: Origin | None = field(default=None, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class MtlsMode(StrEnum):
    UNSET = "UNSET"  # inherit from the namespace, then the mesh; the mesh default is PERMISSIVE
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


@dataclass(frozen=True)
class PeerAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    mode: MtlsMode = MtlsMode.UNSET
    port_level: Mapping[int, MtlsMode] = field(default_factory=dict, hash=False)
    origin: Origin | None = field(default=None, compare=False)


@dataclass(frozen=True)
class JwtHeader:
    name: str
    prefix: str = ""


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None  # inline JWKS JSON, as Istio takes it
    from_headers: tuple[JwtHeader, ...] = ()  # empty: `Authorization: Bearer <token>`
    from_params: tuple[str, ...] = ()
    output_payload_to_header: str | None = None
    forward_original_token: bool = False


@dataclass(frozen=True)
class RequestAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None = field(default=None, hash=False)
    jwt_rules: tuple[JwtRule, ...] = ()
    origin: Origin | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Request:
    """One request as seen at a workload's inbound sidecar. Paths are raw; the evaluator
    normalizes them exactly as Envoy is configured to."""

    method: str = "GET"
    path: str = "/"
    host: str = ""
    destination_port: int = 0
    source_principal: str | None = None  # full SPIFFE URI; None on plaintext
    source_ip: str | None = None
    remote_ip: str | None = None  # from X-Forwarded-For per Istio; defaults to source_ip
    destination_ip: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)  # lowercase names
    claims: Mapping[str, Any] | None = field(
        default=None, hash=False
    )  # verified JWT; None: no token
    sni: str | None = None


@dataclass(frozen=True)
class DryRunResult:
    """What a dry-run policy would have done had it been enforced."""

    policy: str  # ns/name
    action: Action
    matched: bool
    rule: int | None
    would_deny: bool


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    policy: str | None = None  # ns/name of the deciding policy; None when no policy decided
    rule: int | None = None
    action: Action | None = None  # the deciding policy's action
    dry_run: tuple[DryRunResult, ...] = ()
    audit: bool = False
    audit_policies: tuple[str, ...] = ()

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"
