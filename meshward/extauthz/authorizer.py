"""One Check, start to finish, without gRPC or telemetry: which workload, who is calling (peer
SPIFFE ID and end-user JWT), the decision (cached, or from meshward.policy.evaluate), and the
CheckResponse that carries it.

The policy set lives in an immutable snapshot swapped atomically on update; each snapshot memoizes
a per-workload plan (what the workload's policies read, which JWT rules apply), computed once per
version per workload.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from meshward.extauthz import response as responses
from meshward.extauthz.cache import DEFAULT_MAX_BYTES, DEFAULT_TTL, DecisionCache
from meshward.extauthz.plan import (
    HEADER_PREFIX,
    AttributePlan,
    RequestFacts,
    attributes_read,
    key_function,
)
from meshward.extauthz.response import decision_metadata as _metadata
from meshward.extauthz.response import deny_response
from meshward.extauthz.tokens import (
    JwtVerifier,
    TokenRejected,
    VerifiedToken,
    payload_expiry,
    payload_from_metadata,
    payload_principal,
)
from meshward.policy import evaluate as policy_evaluate
from meshward.policy.evaluator import REJECTED_BEFORE_AUTHORIZATION, plaintext_refusal
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Decision,
    DenialDetails,
    DryRunResult,
    JwtEnforcement,
    JwtRule,
    Protocol,
    Request,
    Workload,
)
from meshward.policy.paths import PathRejected, check_request_target, normalize_path

log = logging.getLogger("meshward.extauthz")

# ExtAuthzPerRoute check_settings.context_extensions keys (set by meshward.compile).
WORKLOAD_KEY = "workload"  # "<ns>/<name>"
PORT_KEY = "port"  # the declared service port the request arrived on (runtime ports differ)
MAX_PATH_BYTES = 16 * 1024
MAX_HEADERS = 512
MAX_HEADER_BYTES = 96 * 1024  # Envoy's own default limit is 60 KiB

Custom = Callable[[AuthorizationPolicy, Request], tuple[bool, str]]
Evaluate = Callable[..., Decision]


# Paths repeat; normalizing is pure. (lru_cache does not keep exceptions: rejected paths redo it.)
# Only short paths are memoized: 8192 memoized 16 KiB paths would hold ~256 MiB (issue 13).
_MEMO_PATH_CHARS = 512
_normalize_memo = functools.lru_cache(maxsize=8192)(normalize_path)


def _normalize(path: str) -> str:
    return _normalize_memo(path) if len(path) <= _MEMO_PATH_CHARS else normalize_path(path)


@dataclass
class CheckResult:
    """What one Check decided and why: the response, plus everything spans and logs report."""

    response: Any
    allowed: bool
    http_status: int  # 200 allow, 403 deny, 401 bad token
    reason: str
    policy: str | None = None
    rule: int | None = None
    workload: str | None = None
    source_principal: str | None = None
    user: str | None = None
    method: str = ""
    path: str = ""
    cache_hit: bool | None = None  # None: not cacheable / not reached
    policy_version: str = ""
    dry_run: tuple[DryRunResult, ...] = ()
    audit_policies: tuple[str, ...] = ()
    code: str = ""  # a denial's stable reason code (meshward.extauthz.response.REASON_CODES)
    verbose: bool = False  # the mesh's denialDetails: verbose (the caller sees policy + reason)

    @property
    def decision(self) -> str:
        return "allow" if self.allowed else "deny"


# Accounted bytes of a cached decision besides its strings: the CachedDecision, its Decision,
# their dicts and tuples (measured ~700 on CPython 3.12), and per memoized allow response the
# upb message, its Python wrapper and the memo key tuple (measured ~3x the serialized size + 600).
DECISION_OVERHEAD = 1024
RESPONSE_OVERHEAD = 1024
MEMO_LIMIT = 16  # allow responses memoized per decision (identities sharing it)


@dataclass
class CachedDecision:
    """A decision as cached: the evaluator's answer plus allow responses memoized per identity
    (principal, user, token location) so a hit builds no protobuf."""

    decision: Decision
    # The policy a denial names: the deciding one, or (no ALLOW policy matched) the ALLOW
    # policies that were in force, comma-separated, so the caller knows what to ask for.
    policy: str | None = None
    responses: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    memo_bytes: int = 0  # accounted bytes of ``responses`` (kept up to date with it)

    def accounted_bytes(self) -> int:
        """What the decision cache charges for this value (see meshward.extauthz.cache)."""
        d = self.decision
        strings = len(d.reason) + len(d.policy or "") + len(self.policy or "")
        strings += sum(len(r.policy) + 64 for r in d.dry_run)
        strings += sum(len(p) + 64 for p in d.audit_policies)
        return DECISION_OVERHEAD + 2 * strings + self.memo_bytes


def decision_cache(
    max_bytes: int, ttl: float, *, timer: Callable[[], float] = time.monotonic
) -> DecisionCache[CachedDecision]:
    """The cache an Authorizer uses, weighing each decision by its accounted bytes."""
    return DecisionCache(max_bytes, ttl, timer=timer, sizeof=CachedDecision.accounted_bytes)


@dataclass(frozen=True)
class WorkloadPlan:
    workload: Workload
    plan: AttributePlan
    key_of: Callable[[RequestFacts], tuple[object, ...]] | None
    jwt_rules: tuple[JwtRule, ...]
    rules_id: int
    rule_owners: Mapping[JwtRule, tuple[str, int]]  # rule -> (RequestAuthentication ref, index)
    payload_headers: tuple[str, ...]  # every outputPayloadToHeader name (set or removed)
    expiries: tuple[float, ...]  # epoch seconds
    reads_headers: bool = False

    def next_expiry(self, now: float) -> float | None:
        index = bisect_right(self.expiries, now)
        return self.expiries[index] if index < len(self.expiries) else None


class _Snapshot:
    def __init__(self, policy_set: Any, authorizer: Authorizer) -> None:
        self.policy_set = policy_set
        self.version: str = policy_set.version
        self.verbose = policy_set.mesh.denial_details is DenialDetails.VERBOSE
        # Envoy's jwt_authn verifies tokens (MeshConfig jwtEnforcement: native): claims come
        # from the Check's metadata context, never from a token we verify again.
        self.jwt_native = policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE
        self._authorizer = authorizer
        self._plans: dict[str, WorkloadPlan | None] = {}
        self._by_principal: dict[str, list[str]] | None = None
        self._lock = threading.Lock()

    def plan(self, ref: str) -> WorkloadPlan | None:
        try:
            return self._plans[ref]
        except KeyError:
            pass
        with self._lock:
            if ref not in self._plans:
                workload = self.policy_set.workload(ref)
                self._plans[ref] = None if workload is None else self._build(workload)
            return self._plans[ref]

    def _build(self, workload: Workload) -> WorkloadPlan:
        policies = self.policy_set.policies_for(workload)  # expired included: a superset is safe
        plan = attributes_read(
            policies,
            custom_hook=self._authorizer.custom is not None,
            tcp_ports=any(p.protocol is Protocol.TCP for p in workload.ports),
        )
        rules: list[JwtRule] = []
        owners: dict[JwtRule, tuple[str, int]] = {}
        for ra in self.policy_set.request_authentications_for(workload):
            for index, rule in enumerate(ra.jwt_rules):
                rules.append(rule)
                owners.setdefault(rule, (f"{ra.namespace}/{ra.name}", index))
        jwt_rules = tuple(rules)
        return WorkloadPlan(
            workload=workload,
            plan=plan,
            key_of=key_function(plan.attributes) if plan.attributes is not None else None,
            jwt_rules=jwt_rules,
            rules_id=self._authorizer.verifier.rules_id(jwt_rules),
            rule_owners=owners,
            payload_headers=tuple(
                sorted(
                    {
                        r.output_payload_to_header.lower()
                        for r in jwt_rules
                        if r.output_payload_to_header
                    }
                )
            ),
            expiries=tuple(e.timestamp() for e in plan.expiries),
            reads_headers=any(a.startswith(HEADER_PREFIX) for a in plan.attributes or ()),
        )

    def workload_for_principal(self, principal: str) -> tuple[str | None, str]:
        """(ref, "") or (None, why not): the destination SPIFFE ID must name one workload."""
        if self._by_principal is None:
            index: dict[str, list[str]] = {}
            trust_domain = self.policy_set.mesh.trust_domain
            for workload in self.policy_set.workloads:
                index.setdefault(workload.spiffe_id(trust_domain), []).append(workload.ref)
            self._by_principal = index
        refs = self._by_principal.get(principal, [])
        if len(refs) == 1:
            return refs[0], ""
        if not refs:
            return None, f"no workload has identity {principal}"
        return (
            None,
            f"identity {principal} is shared by {', '.join(refs)}; set context_extensions.workload",
        )


class Authorizer:
    """Thread-safe. ``check(request, trace_id)`` never raises for bad input: malformed requests,
    unknown workloads and bad tokens are denials with a reason (internal errors are the
    caller's to catch; see service.py)."""

    def __init__(
        self,
        policy_set: Any,
        *,
        verifier: JwtVerifier | None = None,
        cache: DecisionCache[CachedDecision] | None = None,
        custom: Custom | None = None,
        evaluate: Evaluate | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier if verifier is not None else JwtVerifier()
        self.cache: DecisionCache[CachedDecision] = (
            cache if cache is not None else decision_cache(DEFAULT_MAX_BYTES, DEFAULT_TTL)
        )
        self.custom = custom
        self._evaluate = evaluate or policy_evaluate
        self._wall = wall_clock
        self._clock = clock
        self.evaluations = 0  # policy evaluations (cache misses and uncacheable requests)
        self._count_lock = threading.Lock()
        self._snapshot = _Snapshot(policy_set, self)

    # -- policy ----------------------------------------------------------------------------------
    def update(self, policy_set: Any) -> None:
        """Swap in a new policy set. Old cache entries become unreachable (keys carry the
        version) and age out."""
        if policy_set.version != self._snapshot.version:
            self._snapshot = _Snapshot(policy_set, self)

    @property
    def policy_set(self) -> Any:
        return self._snapshot.policy_set

    @property
    def version(self) -> str:
        return self._snapshot.version

    @property
    def verbose_denials(self) -> bool:
        """The mesh's ``denialDetails: verbose``: denial bodies name policy, rule and reason."""
        return self._snapshot.verbose

    def plan(self, ref: str) -> WorkloadPlan | None:
        return self._snapshot.plan(ref)

    # -- the check -------------------------------------------------------------------------------
    def check(self, request: Any, trace_id: str = "") -> CheckResult:
        snapshot = self._snapshot  # one version for the whole check
        version = snapshot.version
        attrs = request.attributes
        http = attrs.request.http
        method = http.method
        raw_path = http.path
        if not method or not raw_path:
            return self._deny(
                403,
                "malformed CheckRequest: no HTTP method/path in attributes.request.http",
                trace_id,
                version,
                method=method,
                path=raw_path,
                code="malformed_request",
            )
        headers: Mapping[str, str] = http.headers
        if not headers and len(http.header_map.headers):
            headers = _header_map(http.header_map)
        too_big = _oversized(raw_path, headers)
        if too_big:
            return self._deny(
                403,
                too_big,
                trace_id,
                version,
                method=method,
                path=raw_path[:256],
                code="request_too_large",
            )
        source_principal = attrs.source.principal or None

        # Which workload: the compiler's per-route context extension, else the server identity.
        ref = attrs.context_extensions.get(WORKLOAD_KEY)
        if not ref:
            destination = attrs.destination.principal
            if not destination:
                return self._deny(
                    403,
                    "cannot identify the workload: no context_extensions.workload and no destination principal",
                    trace_id,
                    version,
                    method=method,
                    path=raw_path,
                    source_principal=source_principal,
                    code="unknown_workload",
                )
            ref, why = snapshot.workload_for_principal(destination)
            if ref is None:
                return self._deny(
                    403,
                    f"cannot identify the workload: {why}",
                    trace_id,
                    version,
                    method=method,
                    path=raw_path,
                    source_principal=source_principal,
                    code="unknown_workload",
                )
        plan = snapshot.plan(ref)
        if plan is None:
            return self._deny(
                403,
                f"unknown workload {ref} (not in policy version {version[:12]})",
                trace_id,
                version,
                method=method,
                path=raw_path,
                source_principal=source_principal,
                workload=ref,
                code="unknown_workload",
            )

        if plan.reads_headers and any(k != k.lower() for k in headers):
            # Envoy sends lowercase names; anything else is lowercased exactly as the evaluator
            # does, so the cache key sees the header values the rules will see.
            headers = {k.lower(): v for k, v in headers.items()}
        try:
            path = _normalize(raw_path)
        except ValueError as exc:  # PathRejected: Envoy rejects these before us when configured
            return self._deny(
                403,
                f"path rejected: {exc}",
                trace_id,
                version,
                method=method,
                path=raw_path,
                source_principal=source_principal,
                workload=ref,
                code="request_rejected",
            )

        token: VerifiedToken | None = None
        claims: Mapping[str, Any] | None = None
        if plan.jwt_rules and snapshot.jwt_native:
            # jwt_authn verified the token before us (401 when invalid) and may have removed
            # it: the verified payload is in the Check's metadata context.
            claims = payload_from_metadata(attrs.metadata_context)
        elif plan.jwt_rules:
            try:
                token = self.verifier.authenticate(
                    plan.jwt_rules, headers, raw_path, rules_id=plan.rules_id
                )
            except TokenRejected as exc:
                owner = _owner_of(plan)
                return self._deny(
                    401,
                    exc.reason,
                    trace_id,
                    version,
                    method=method,
                    path=path,
                    source_principal=source_principal,
                    workload=ref,
                    policy=owner[0],
                    rule=owner[1],
                    code="invalid_token",
                )
        if token is not None:
            claims = token.claims
        user = token.principal if token is not None else payload_principal(claims)
        expires_at = token.expires_at if token is not None else payload_expiry(claims)

        dest = attrs.destination.address.socket_address
        source_address = attrs.source.address.socket_address.address
        declared = attrs.context_extensions.get(PORT_KEY)  # rules name declared ports
        destination_port = (
            int(declared)
            if declared and declared.isascii() and declared.isdigit()
            else dest.port_value
        )
        facts = RequestFacts(
            method=method,
            path=path,
            host=http.host,
            destination_port=destination_port,
            source_principal=source_principal,
            source_ip=source_address or None,
            destination_ip=dest.address or None,
            sni=attrs.tls_session.sni or None,
            headers=headers,
            claims=claims,
        )

        # Refusals that happen before any rule is read depend on fields the cache key may not
        # hold (a rule-free key would otherwise serve one bad Host's denial to good requests),
        # so they are decided here, before the cache, by the evaluator's own checks.
        code = "mtls_required"
        try:
            check_request_target(http.host, path)
            refusal = plaintext_refusal(
                snapshot.policy_set,
                plan.workload,
                Request(source_principal=source_principal, destination_port=destination_port),
            )
        except PathRejected as exc:
            refusal, code = f"{REJECTED_BEFORE_AUTHORIZATION}: {exc}", "request_rejected"
        if refusal is not None:
            return self._deny(
                403,
                refusal,
                trace_id,
                version,
                method=method,
                path=path,
                source_principal=source_principal,
                workload=ref,
                code=code,
            )

        def compute() -> tuple[CachedDecision, float]:
            wall = self._wall()  # one instant for the decision, the denial and the expiry
            now = datetime.fromtimestamp(wall, UTC)
            decision = self._decide(snapshot, plan, facts, raw_path, now)
            policy = decision.policy
            if policy is None and not decision.allowed:
                policy = self._unmatched_allows(snapshot, plan.workload, now)
            return CachedDecision(decision, policy), self._expiry(plan, expires_at, wall)

        hit: bool | None
        key: tuple[object, ...] | None = None
        if plan.key_of is not None:
            key = (version, ref, *plan.key_of(facts))
            cached, hit = self.cache.get_or_compute(key, compute)
        else:
            cached, _ = compute()
            hit = None
        decision = cached.decision
        result = CheckResult(
            response=None,
            allowed=decision.allowed,
            http_status=200 if decision.allowed else 403,
            reason=decision.reason,
            policy=cached.policy if not decision.allowed else decision.policy,
            rule=decision.rule,
            workload=ref,
            source_principal=source_principal,
            user=user,
            method=method,
            path=path,
            cache_hit=hit,
            policy_version=version,
            dry_run=decision.dry_run,
            audit_policies=decision.audit_policies if decision.audit else (),
        )
        if decision.allowed:
            result.response = self._allow_response(cached, plan, result, token, key)
        else:
            result.code = (
                "denied_by_policy"
                if decision.action in (Action.DENY, Action.CUSTOM)
                else "no_matching_allow"
            )
            result.verbose = snapshot.verbose
            result.response = deny_response(result, trace_id)
        return result

    def _decide(
        self,
        snapshot: _Snapshot,
        plan: WorkloadPlan,
        facts: RequestFacts,
        raw_path: str,
        now: datetime,
    ) -> Decision:
        with self._count_lock:
            self.evaluations += 1
        request = Request(
            method=facts.method,
            path=raw_path,
            host=facts.host,
            destination_port=facts.destination_port,
            source_principal=facts.source_principal,
            source_ip=facts.source_ip,
            destination_ip=facts.destination_ip,
            headers=dict(facts.headers),
            claims=dict(facts.claims) if facts.claims is not None else None,
            sni=facts.sni,
        )
        return self._evaluate(
            snapshot.policy_set, plan.workload, request, now=now, custom=self.custom
        )

    def _unmatched_allows(
        self, snapshot: _Snapshot, workload: Workload, now: datetime
    ) -> str | None:
        refs = [
            p.ref
            for p in snapshot.policy_set.policies_for(workload, now)
            if p.action is Action.ALLOW and not p.dry_run
        ]
        return ",".join(refs) or None

    def _expiry(self, plan: WorkloadPlan, expires_at: float | None, wall: float) -> float:
        """Monotonic instant the entry must be gone: TTL, the token's exp, the next policy
        expiry, whichever comes first."""
        mono = self._clock()
        until = mono + self.cache.ttl
        if expires_at is not None:
            until = min(until, mono + (expires_at - wall))
        next_expiry = plan.next_expiry(wall)
        if next_expiry is not None:
            until = min(until, mono + (next_expiry - wall))
        return until

    def _allow_response(
        self,
        cached: CachedDecision,
        plan: WorkloadPlan,
        result: CheckResult,
        token: VerifiedToken | None,
        key: tuple[object, ...] | None = None,
    ) -> Any:
        memo_key = (
            result.source_principal,
            result.user,
            result.cache_hit,
            token.location if token else None,
            token.payload_segment if token and token.rule.output_payload_to_header else None,
        )
        found = cached.responses.get(memo_key)
        if found is not None:
            return found
        set_headers: list[tuple[str, str]] = []
        remove: list[str] = []
        remove_params: list[str] = []
        if result.source_principal:
            set_headers.append((responses.PRINCIPAL_HEADER, result.source_principal))
        else:
            remove.append(responses.PRINCIPAL_HEADER)
        if token is not None:
            set_headers.append((responses.USER_HEADER, token.principal))
            payload_header = token.rule.output_payload_to_header
            if payload_header:
                set_headers.append((payload_header.lower(), token.payload_segment))
            remove.extend(h for h in plan.payload_headers if h != (payload_header or "").lower())
            if not token.rule.forward_original_token:  # Istio default: the app never sees it
                if token.location.header is not None:
                    remove.append(token.location.header)
                elif token.location.param is not None:
                    remove_params.append(token.location.param)
        else:
            remove.append(responses.USER_HEADER)
            remove.extend(plan.payload_headers)
        built = responses.allow(
            set_headers=set_headers,
            remove_headers=remove,
            remove_params=remove_params,
            metadata=_metadata(result),
        )
        size = RESPONSE_OVERHEAD + 3 * built.ByteSize() + sum(len(str(p)) for p in memo_key)
        if len(cached.responses) >= MEMO_LIMIT:  # many identities share it: keep the memo small
            cached.responses.clear()
            cached.memo_bytes = 0
        cached.responses[memo_key] = built
        cached.memo_bytes += size
        if key is not None:
            self.cache.recharge(key)  # the entry grew: charge it, evicting others to fit
        return built

    def _deny(
        self,
        status: int,
        reason: str,
        trace_id: str,
        version: str,
        *,
        method: str = "",
        path: str = "",
        source_principal: str | None = None,
        workload: str | None = None,
        policy: str | None = None,
        rule: int | None = None,
        code: str = "request_rejected",
    ) -> CheckResult:
        result = CheckResult(
            response=None,
            allowed=False,
            http_status=status,
            reason=reason,
            code=code,
            verbose=self._snapshot.verbose,
            policy=policy,
            rule=rule,
            workload=workload,
            source_principal=source_principal,
            method=method,
            path=path,
            policy_version=version,
        )
        result.response = deny_response(result, trace_id)
        return result


def _owner_of(plan: WorkloadPlan) -> tuple[str | None, int | None]:
    """The RequestAuthentication to name in a 401: the only one, or none when several apply."""
    owners = {owner for owner, _ in plan.rule_owners.values()}
    if len(plan.jwt_rules) == 1:
        ref, index = plan.rule_owners[plan.jwt_rules[0]]
        return ref, index
    if len(owners) == 1:
        return next(iter(owners)), None
    return None, None


def _header_map(header_map: Any) -> dict[str, str]:
    """Envoy sends ``header_map`` instead of ``headers`` when ``encode_raw_headers`` is set."""
    out: dict[str, str] = {}
    for entry in header_map.headers:
        value = entry.value or entry.raw_value.decode("utf-8", "replace")
        key = entry.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def _oversized(path: str, headers: Mapping[str, str]) -> str:
    if len(path) > MAX_PATH_BYTES:
        return f"request too large: path of {len(path)} bytes (limit {MAX_PATH_BYTES})"
    if len(headers) > MAX_HEADERS:
        return f"request too large: {len(headers)} headers (limit {MAX_HEADERS})"
    if len(headers) > 64:
        size = sum(len(k) + len(v) for k, v in headers.items())
        if size > MAX_HEADER_BYTES:
            return f"request too large: {size} bytes of headers (limit {MAX_HEADER_BYTES})"
    return ""
