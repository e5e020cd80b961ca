"""Synthetic policy sets and requests, for tests and benchmarks of the compiler.

Values are drawn from a small universe (a few identities, paths with normalization tricks,
hosts, headers, ports, tokens) so random rules and random requests actually meet: a generated
request matches some rules and misses others, which is what a decision-equivalence test needs.
Seeded ``random.Random``: the same seed gives the same policy set and the same requests.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    JwtRule,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    Protocol,
    Request,
    RequestAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.policy.policyset import PolicySet

TRUST_DOMAIN = "cluster.local"
TARGET_NAMESPACE = "shop"
TARGET_NAME = "api"
TARGET_REF = f"{TARGET_NAMESPACE}/{TARGET_NAME}"
HTTP_PORTS = (8080, 9090)
TCP_PORT = 7000

# Callers: (namespace, service account); None is a plaintext client.
IDENTITIES: tuple[tuple[str, str] | None, ...] = (
    ("shop", "web"),
    ("shop", "worker"),
    ("ops", "admin"),
    ("other", "intruder"),
    ("shopping", "web"),  # shares a name prefix with "shop": namespace matching must be exact
    None,
)
METHODS = ("GET", "POST", "DELETE", "PUT")
PATHS = (
    "/",
    "/api/items",
    "/api/items/42",
    "/api/items?q=/admin",
    "/admin",
    "/admin/users",
    "/public/index.html",
    "/x/a/y",
    "/x/a/b/y",
    "/healthz",
    "/API/items",
    # normalization tricks: the evaluator and Envoy must both see /admin (or reject)
    "//admin",
    "/public/../admin",
    "/public/./../admin/users",
    "/a/%2e%2e/admin",
    "/%61dmin",
    "/admin/",
    "/api//items",
    "/admin%2Fusers",
    "/admin%5cusers",
    # a dot segment with ";" parameters Envoy does not strip (escaped dots): 400 before authz
    "/x/%2e%2e;/admin",
    "/api/items?next=/..;/admin",
    # ... and with the ";" escaped (Envoy keeps %3B/%3b as sent): 400 too
    "/x/..%3b/admin",
    "/x/%2E%2e%3B/admin",
    "/admin/.%3b",
)
HOSTS = (
    "api.shop",
    "API.Shop",
    "api.shop:8080",
    "www.example.com",
    "a.example.com",
    # a trailing dot is stripped (strip_trailing_host_dot) before host rules see it
    "api.shop.",
    "a.example.com.:8080",
)
# Requests only (never in rules): not one host[:port], what Envoy makes of two Host headers and
# friends; the sidecar answers 400 before authorization.
BAD_HOSTS = ("api.shop,www.example.com", "www.example.com,api.shop", "api.shop@a.example.com")
# "" is a header sent with an empty value: present (Istio's `*` matches it), equal to nothing.
HEADER_VALUES: Mapping[str, tuple[str | None, ...]] = {
    "x-team": (None, "blue", "red", "blue,red", "green", ""),
    "x-env": (None, "prod", "dev", ""),
    "x-custom": (None, None, None, "deny"),
}
XFF = (None, None, "10.1.2.3", "192.168.7.7, 10.1.2.3", "203.0.113.9")
SNIS = (None, "api.shop", "other.example.com")
# Test tokens: "Bearer <user>" stands for a verified JWT with these claims.
ISSUER = "https://idp.example.com"
USERS: Mapping[str, Mapping[str, Any]] = {
    "alice": {"iss": ISSUER, "sub": "alice", "groups": ["admins", "dev"], "aud": ["shop"]},
    "bob": {"iss": ISSUER, "sub": "bob", "groups": ["users"], "aud": ["shop", "other"]},
}
INVALID_USER = "mallory"  # "Bearer mallory" stands for a token that does not verify
TOKEN_PARAM = "access_token"  # Istio's default query parameter for a token


def token_in(headers: Mapping[str, str], path: str) -> str | None:
    """The token a request carries at Istio's default locations (``Authorization: Bearer``,
    then ``?access_token=``), as the ext_authz service finds it; ``headers`` lowercase."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    query = path.partition("?")[2].partition("#")[0]
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name == TOKEN_PARAM:
            return value or None
    return None


def spiffe(namespace: str, sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"


def _pick(
    rng: random.Random, values: tuple[Any, ...], low: int = 1, high: int = 2
) -> tuple[Any, ...]:
    count = rng.randint(low, min(high, len(values)))
    return tuple(rng.sample(values, count))


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    """Distinct values in first-seen order (a set's order would change with PYTHONHASHSEED)."""
    return tuple(dict.fromkeys(values))


def _principal_pattern(rng: random.Random) -> str:
    ns, sa = rng.choice([i for i in IDENTITIES if i is not None])
    return rng.choice(
        [
            f"{TRUST_DOMAIN}/ns/{ns}/sa/{sa}",
            f"{TRUST_DOMAIN}/ns/{ns}/*",
            f"*/sa/{sa}",
            "*",
        ]
    )


def _namespace_pattern(rng: random.Random) -> str:
    return rng.choice(["shop", "ops", "other", "sh*", "*ps", "*ing", "*"])


def _path_pattern(rng: random.Random) -> str:
    return rng.choice(
        [
            "/admin",
            "/admin/*",
            "/api/*",
            "/api/items",
            "*/users",
            "/public/*",
            "/x/{*}/y",
            "/x/{**}",
            "*",
            "/healthz",
        ]
    )


def _source(rng: random.Random, *, jwt: bool) -> Source:
    kinds = [
        "principals",
        "namespaces",
        "ip_blocks",
        "remote_ip_blocks",
        "not_principals",
        "not_namespaces",
        "not_ip_blocks",
    ]
    if jwt:
        kinds += ["request_principals", "not_request_principals"]
    chosen = rng.sample(kinds, rng.randint(1, 2))
    values: dict[str, tuple[str, ...]] = {}
    for kind in chosen:
        if "principals" in kind and "request" not in kind:
            values[kind] = _unique(_principal_pattern(rng) for _ in range(rng.randint(1, 2)))
        elif "namespaces" in kind:
            values[kind] = _unique(_namespace_pattern(rng) for _ in range(rng.randint(1, 2)))
        elif kind in ("ip_blocks", "not_ip_blocks"):
            values[kind] = _pick(rng, ("127.0.0.1", "127.0.0.0/8", "10.0.0.0/8"), 1, 1)
        elif kind == "remote_ip_blocks":
            values[kind] = _pick(rng, ("10.1.0.0/16", "192.168.0.0/16", "127.0.0.1"), 1, 2)
        else:
            values[kind] = _pick(rng, (f"{ISSUER}/alice", f"{ISSUER}/*", "*"), 1, 1)
    return Source(**values)


def _operation(rng: random.Random) -> Operation:
    kinds = ["methods", "paths", "hosts", "ports", "not_methods", "not_paths", "not_hosts"]
    chosen = rng.sample(kinds, rng.randint(1, 3))
    values: dict[str, Any] = {}
    for kind in chosen:
        if kind.endswith("methods"):
            values[kind] = _pick(rng, ("GET", "POST", "DELETE", "P*", "*"))
        elif kind.endswith("paths"):
            values[kind] = _unique(_path_pattern(rng) for _ in range(rng.randint(1, 2)))
        elif kind.endswith("hosts"):
            values[kind] = _pick(rng, ("api.shop", "*.example.com", "api.*", "*"))
        else:
            values[kind] = _pick(rng, (*HTTP_PORTS, 1234), 1, 1)
    return Operation(**values)


def _condition(rng: random.Random, *, jwt: bool) -> Condition:
    keys = [
        "request.headers[x-team]",
        "request.headers[x-env]",
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "destination.port",
        "destination.ip",
        "connection.sni",
    ]
    if jwt:
        keys += ["request.auth.claims[groups]", "request.auth.principal", "request.auth.audiences"]
    key = rng.choice(keys)
    universe: tuple[str, ...] = {
        "request.headers[x-team]": ("blue", "red", "gr*", "*"),
        "request.headers[x-env]": ("prod", "*"),
        "source.ip": ("127.0.0.1", "10.0.0.0/8"),
        "remote.ip": ("10.1.2.3", "192.168.0.0/16", "127.0.0.1"),
        "source.namespace": ("shop", "ops", "*"),
        "source.principal": (f"{TRUST_DOMAIN}/ns/shop/sa/web", "*/sa/admin", "*"),
        "destination.port": tuple(str(p) for p in HTTP_PORTS),
        "destination.ip": ("127.0.0.1", "10.0.0.0/8"),
        "connection.sni": ("api.shop", "*.example.com", "*"),
        "request.auth.claims[groups]": ("admins", "users", "*"),
        "request.auth.principal": (f"{ISSUER}/alice", f"{ISSUER}/*"),
        "request.auth.audiences": ("shop", "oth*"),
    }[key]
    if rng.random() < 0.3:
        return Condition(key=key, not_values=_pick(rng, universe, 1, 1))
    return Condition(key=key, values=_pick(rng, universe))


def random_rule(rng: random.Random, *, jwt: bool) -> Rule:
    sources = tuple(_source(rng, jwt=jwt) for _ in range(rng.choice((0, 1, 1, 2))))
    operations = tuple(_operation(rng) for _ in range(rng.choice((0, 1, 1, 2))))
    conditions = tuple(_condition(rng, jwt=jwt) for _ in range(rng.choice((0, 0, 1, 2))))
    return Rule(sources=sources, operations=operations, conditions=conditions)


@dataclass(frozen=True)
class Profile:
    """What a generated policy set may contain."""

    policies: tuple[int, int] = (1, 6)
    jwt: bool = False  # rules reading the end-user JWT (ext_authz)
    custom: bool = False  # CUSTOM policies (ext_authz)
    dry_run: bool = True
    audit: bool = False
    mtls: MtlsMode = MtlsMode.PERMISSIVE
    actions: tuple[Action, ...] = field(default=(Action.ALLOW, Action.ALLOW, Action.DENY))
    request_authn: bool = False  # a RequestAuthentication selects shop/api (invalid token: 401)


def target_workloads(*, tcp: bool = False) -> list[Workload]:
    ports = [WorkloadPort(name=f"http-{p}", port=p, protocol=Protocol.HTTP) for p in HTTP_PORTS]
    if tcp:
        ports.append(WorkloadPort(name="tcp", port=TCP_PORT, protocol=Protocol.TCP))
    out = [
        Workload(
            namespace=TARGET_NAMESPACE,
            name=TARGET_NAME,
            labels={"app": TARGET_NAME},
            service_account=TARGET_NAME,
            ports=tuple(ports),
        )
    ]
    for identity in IDENTITIES:
        if identity is not None:
            ns, sa = identity
            out.append(
                Workload(
                    namespace=ns,
                    name=sa,
                    labels={"app": sa},
                    service_account=sa,
                    ports=(WorkloadPort(name="http", port=8080),),
                )
            )
    return out


def random_policy_set(seed: int, profile: Profile | None = None, *, tcp: bool = False) -> PolicySet:
    """Policies for ``shop/api`` (plus a few callers as workloads) from ``seed``."""
    profile = profile or Profile()
    rng = random.Random(seed)
    actions = list(profile.actions)
    if profile.custom:
        actions.append(Action.CUSTOM)
    if profile.audit:
        actions.append(Action.AUDIT)
    policies: list[AuthorizationPolicy] = []
    for i in range(rng.randint(*profile.policies)):
        action = rng.choice(actions)
        rules = tuple(random_rule(rng, jwt=profile.jwt) for _ in range(rng.choice((1, 1, 2, 3))))
        policies.append(
            AuthorizationPolicy(
                namespace=TARGET_NAMESPACE if rng.random() < 0.85 else "meshward-system",
                name=f"p{i}-{action.value.lower()}",
                action=action,
                selector={"app": TARGET_NAME} if rng.random() < 0.7 else None,
                rules=rules,
                provider="test-authz" if action is Action.CUSTOM else None,
                dry_run=profile.dry_run and action is not Action.CUSTOM and rng.random() < 0.15,
            )
        )
    peer = PeerAuthentication(namespace=TARGET_NAMESPACE, name="default", mode=profile.mtls)
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TRUST_DOMAIN),
        workloads=target_workloads(tcp=tcp),
        authorization_policies=policies,
        peer_authentications=[peer],
        request_authentications=[request_authentication()] if profile.request_authn else [],
    )


def request_authentication() -> RequestAuthentication:
    """End-user JWTs for shop/api at Istio's default locations (the keys do not matter here:
    the harness' Check server stands in for verification, see :data:`USERS`)."""
    return RequestAuthentication(
        namespace=TARGET_NAMESPACE,
        name="end-user",
        selector={"app": TARGET_NAME},
        jwt_rules=(JwtRule(issuer=ISSUER, jwks='{"keys": []}'),),
    )


@dataclass(frozen=True)
class Probe:
    """One generated request and how to send it."""

    identity: tuple[str, str] | None  # (ns, sa); None: plaintext
    port: int  # declared
    method: str
    path: str
    host: str
    headers: Mapping[str, str]
    sni: str | None
    user: str | None
    token_param: bool = False  # the token is in ``path`` (?access_token=), not Authorization

    @property
    def principal(self) -> str | None:
        return spiffe(*self.identity) if self.identity else None

    def wire_headers(self) -> dict[str, str]:
        out = {"Host": self.host, **self.headers}
        if self.user and not self.token_param:
            out["Authorization"] = f"Bearer {self.user}"
        return out

    def request(self) -> Request:
        """The request as the evaluator sees it at the sidecar."""
        headers = {k.lower(): v for k, v in self.headers.items()}
        if self.user and not self.token_param:
            headers["authorization"] = f"Bearer {self.user}"
        xff = headers.get("x-forwarded-for")
        remote = xff.split(",")[-1].strip() if xff else None
        return Request(
            method=self.method,
            path=self.path,
            host=self.host,
            destination_port=self.port,
            source_principal=self.principal,
            source_ip="127.0.0.1",
            remote_ip=remote,
            destination_ip="127.0.0.1",
            headers=headers,
            claims=dict(USERS[self.user]) if self.user is not None and self.user in USERS else None,
            sni=self.sni if self.identity else None,
        )


def random_probes(
    seed: int, count: int, *, plaintext: bool = True, jwt: bool = False, invalid: bool = False
) -> list[Probe]:
    """``jwt``: some requests carry a (valid) end-user token; ``invalid``: some carry one that
    does not verify, and tokens go in the Authorization header or the query."""
    rng = random.Random(seed)
    users: tuple[str | None, ...] = (None, None, "alice", "bob")
    if invalid:
        users += (INVALID_USER,)
    identities = [i for i in IDENTITIES if plaintext or i is not None]
    probes: list[Probe] = []
    for _ in range(count):
        identity = rng.choice(identities)
        headers: dict[str, str] = {}
        for name, values in HEADER_VALUES.items():
            value = rng.choice(values)
            if value is not None:
                headers[name] = value
        xff = rng.choice(XFF)
        if xff:
            headers["X-Forwarded-For"] = xff
        port = rng.choice(HTTP_PORTS)
        method = rng.choice(METHODS)
        path = rng.choice(PATHS)
        host = rng.choice(BAD_HOSTS) if rng.random() < 0.04 else rng.choice(HOSTS)
        sni = rng.choice(SNIS) if identity else None
        user = rng.choice(users) if jwt or invalid else None
        in_query = bool(user) and invalid and rng.random() < 0.35
        if in_query:
            path += ("&" if "?" in path else "?") + f"{TOKEN_PARAM}={user}"
        probes.append(
            Probe(identity, port, method, path, host, headers, sni, user, token_param=in_query)
        )
    return probes


def custom_provider(policy: AuthorizationPolicy, request: Request) -> tuple[bool, str]:
    """The test CUSTOM provider: denies requests carrying ``x-custom: deny``."""
    if request.headers.get("x-custom") == "deny":
        return False, "x-custom: deny"
    return True, "no x-custom: deny"


def expected_status(policy_set: PolicySet, probe: Probe, *, now: Any = None) -> int:
    """What meshward.policy decides for ``probe`` at ``shop/api``: 200, 403, 400 (rejected
    path or Host) or 401 (a token that does not verify, when a RequestAuthentication applies)."""
    from meshward.policy import evaluate
    from meshward.policy.paths import (
        PathRejected,
        check_authority,
        check_dot_segment_parameters,
        normalize_path,
        strip_trailing_host_dot,
    )

    try:
        path = normalize_path(probe.path)
        check_authority(strip_trailing_host_dot(probe.host))
        check_dot_segment_parameters(path)
    except PathRejected:
        return 400
    workload = policy_set.workload(TARGET_REF)
    assert workload is not None
    if policy_set.request_authentications_for(workload):
        token = token_in(probe.request().headers, probe.path)
        if token is not None and token not in USERS:
            return 401  # Istio: a token that does not verify is rejected before authorization
    decision = evaluate(policy_set, workload, probe.request(), now=now, custom=custom_provider)
    return 200 if decision.allowed else 403


def coverage_policy_set(mtls: MtlsMode = MtlsMode.PERMISSIVE) -> PolicySet:
    """Hand-written rules where each mapped dimension is decisive on its own (ports, hosts,
    header elements, SNI, XFF remote ip, namespaces, principal patterns, path templates,
    negations), so a mistake in any one mapping changes some generated request's outcome."""
    web = f"{TRUST_DOMAIN}/ns/shop/sa/web"

    def allow(name: str, *rules: Rule) -> AuthorizationPolicy:
        return AuthorizationPolicy(namespace=TARGET_NAMESPACE, name=name, rules=rules)

    def deny(name: str, *rules: Rule) -> AuthorizationPolicy:
        return AuthorizationPolicy(
            namespace=TARGET_NAMESPACE, name=name, action=Action.DENY, rules=rules
        )

    S, Op, C, R = Source, Operation, Condition, Rule
    policies = [
        allow("web-get", R(sources=(S(principals=(web,)),), operations=(Op(methods=("GET",)),))),
        allow("ops-9090", R(sources=(S(namespaces=("ops",)),), operations=(Op(ports=(9090,)),))),
        allow("public", R(operations=(Op(paths=("/public/*",), not_methods=("DELETE",)),))),
        allow(
            "host-post",
            R(
                operations=(Op(hosts=("api.shop",), methods=("POST",)),),
                conditions=(C(key="destination.port", values=("8080",)),),
            ),
        ),
        allow("team-red", R(conditions=(C(key="request.headers[x-team]", values=("red",)),))),
        allow(
            "sni-template",
            R(
                operations=(Op(paths=("/x/{*}/y",)),),
                conditions=(C(key="connection.sni", values=("api.shop",)),),
            ),
        ),
        allow(
            "xff",
            R(sources=(S(remote_ip_blocks=("10.1.0.0/16",)),), operations=(Op(paths=("/api/*",)),)),
        ),
        allow(
            "worker",
            R(
                sources=(S(principals=("*/sa/worker",)),),
                operations=(Op(not_ports=(9090,), hosts=("*.example.com",)),),
            ),
        ),
        deny(
            "admin", R(sources=(S(not_namespaces=("ops",)),), operations=(Op(paths=("/admin*",)),))
        ),
        deny(
            "dev-delete",
            R(
                operations=(Op(methods=("DELETE",)),),
                conditions=(C(key="request.headers[x-env]", values=("dev",)),),
            ),
        ),
        deny(
            "intruder",
            R(sources=(S(principals=("*/sa/intruder",), not_ip_blocks=("10.0.0.0/8",)),)),
        ),
        deny(
            "worker-writes",
            R(
                sources=(S(principals=(f"{TRUST_DOMAIN}/ns/shop/sa/worker",)),),
                operations=(Op(methods=("DELETE", "PUT"), not_paths=("/public/*",)),),
            ),
        ),
    ]
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TRUST_DOMAIN),
        workloads=target_workloads(),
        authorization_policies=policies,
        peer_authentications=[
            PeerAuthentication(namespace=TARGET_NAMESPACE, name="default", mode=mtls)
        ],
    )


def scale_policy_set(workloads: int, policies: int, seed: int = 0) -> PolicySet:
    """A mesh of ``workloads`` services (ten per namespace) with ``policies`` authorization
    policies spread over them, each naming a few specific callers (as least-privilege policy
    does), for compile-time benchmarks."""
    rng = random.Random(seed)
    ws = [
        Workload(
            namespace=f"team-{i // 10:03d}",
            name=f"svc-{i:04d}",
            labels={"app": f"svc-{i:04d}"},
            service_account=f"svc-{i:04d}",
            ports=(WorkloadPort(name="http", port=8080),),
        )
        for i in range(workloads)
    ]
    out: list[AuthorizationPolicy] = []
    for p in range(policies):
        target = ws[p % workloads]
        callers = rng.sample(ws, 3)
        rules = tuple(
            Rule(
                sources=(Source(principals=tuple(c.principal(TRUST_DOMAIN) for c in callers[:2])),),
                operations=(
                    Operation(methods=("GET", "POST"), paths=(f"/api/v{r}/*", f"/items/{p}")),
                ),
                conditions=(Condition(key="request.headers[x-tenant]", values=(f"t{p % 7}",)),)
                if r
                else (),
            )
            for r in range(rng.randint(1, 2))
        )
        out.append(
            AuthorizationPolicy(
                namespace=target.namespace,
                name=f"policy-{p:05d}",
                action=Action.DENY if rng.random() < 0.2 else Action.ALLOW,
                selector={"app": target.name},
                rules=rules,
            )
        )
    return PolicySet.create(
        mesh=MeshConfig(trust_domain=TRUST_DOMAIN),
        workloads=ws,
        authorization_policies=out,
        peer_authentications=[
            PeerAuthentication(namespace="meshward-system", name="default", mode=MtlsMode.STRICT)
        ],
    )
