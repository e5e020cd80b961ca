"""Decision equivalence: a real Envoy loaded with the compiled inbound config answers every
generated request exactly as meshward.policy.evaluate decides (200 allow / 403 deny / 400
rejected path).

Principals come from real client certificates issued by the mesh CA; paths include the
normalization bypass tricks; requests vary method, host, headers, X-Forwarded-For, SNI, port and
end-user token. Rules that need ext_authz are answered by a minimal gRPC Check server in this
file that evaluates the whole policy with meshward.policy (the real service is meshward.extauthz).
One Envoy per policy set, connections reused, so a few hundred requests take seconds.
"""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import status_pb2

from meshward.certs.ca import CertificateAuthority
from meshward.compile import CompileOptions, Endpoint, names
from meshward.compile.authz import rule_extauthz_reason
from meshward.compile.names import extauthz_spiffe_id, rbac_policy_name
from meshward.extauthz.tokens import payload_from_metadata
from meshward.policy import PolicySet, Request, evaluate
from meshward.policy.explain import explain
from meshward.policy.model import (
    Action,
    AuthorizationPolicy,
    JwtEnforcement,
    JwtRule,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    RequestAuthentication,
    Rule,
    Source,
)
from meshward.testing import synth
from meshward.testing.echo import EchoServer
from meshward.testing.jwt import with_jwt_enforcement
from meshward.testing.jwt_issuer import LocalIssuer, unsigned_token
from meshward.testing.sidecar import (
    SidecarConnection,
    StaticSidecar,
    client_context,
    wait_for_access_log,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)


class CheckServer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Evaluates the current policy set for the workload named in context_extensions."""

    def __init__(self) -> None:
        self.policy_set: PolicySet | None = None
        self.calls = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def Check(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.calls += 1
        try:
            allowed = self._decide(request.attributes)
        except Exception as exc:  # grpcio swallows handler errors: record them, deny
            self.errors.append(repr(exc))
            allowed = False
        if allowed is True:
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))
        code = 403 if allowed is False else allowed
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=16 if code == 401 else 7),
            denied_response=external_auth_pb2.DeniedHttpResponse(
                status=http_status_pb2.HttpStatus(code=code), body=f"{code} from test ext_authz"
            ),
        )

    def _decide(self, attributes: Any) -> bool | int:
        """True (allow), False (403), or 401 for a token that does not verify (as the real
        service does) on a workload with a RequestAuthentication."""
        policy_set = self.policy_set
        assert policy_set is not None
        extensions = dict(attributes.context_extensions)
        workload = policy_set.workload(extensions["workload"])
        assert workload is not None
        http = attributes.request.http
        headers = {k: v for k, v in http.headers.items() if not k.startswith(":")}
        claims: dict[str, Any] | None
        if policy_set.mesh.jwt_enforcement is JwtEnforcement.NATIVE:
            # Envoy's jwt_authn verified the token (401 before us) and may have removed it:
            # the claims come from its payload, as the real service reads them.
            claims = payload_from_metadata(attributes.metadata_context)
        else:
            token = synth.token_in(headers, http.path)
            verifies = bool(policy_set.request_authentications_for(workload))
            if verifies and token is not None and token not in synth.USERS:
                return 401
            claims = dict(synth.USERS[token]) if token in synth.USERS else None
        xff = headers.get("x-forwarded-for")
        request = Request(
            method=http.method,
            path=http.path,
            host=http.host,
            destination_port=int(extensions["port"]),
            source_principal=attributes.source.principal or None,
            source_ip=attributes.source.address.socket_address.address,
            remote_ip=xff.split(",")[-1].strip() if xff else None,
            destination_ip=attributes.destination.address.socket_address.address,
            headers=headers,
            claims=claims,
            sni=attributes.tls_session.sni or None,
        )
        decision = evaluate(policy_set, workload, request, now=NOW, custom=synth.custom_provider)
        return decision.allowed


@pytest.fixture(scope="module")
def check_server(ca: CertificateAuthority) -> Iterator[tuple[CheckServer, int]]:
    """Over mTLS with the ext_authz identity, as the compiled cluster requires (issue 13)."""
    servicer = CheckServer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    svid = ca.issue(extauthz_spiffe_id(MeshConfig(trust_domain=synth.TRUST_DOMAIN)))
    credentials = grpc.ssl_server_credentials(
        [(svid.private_key_pem, svid.cert_chain_pem)],
        root_certificates=ca.trust_bundle().roots_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield servicer, port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def issuer() -> LocalIssuer:
    return LocalIssuer(synth.ISSUER, key_size=2048)


@pytest.fixture(scope="module")
def real_tokens(issuer: LocalIssuer) -> dict[str, str]:
    """synth's users as real RS256 tokens; the invalid user's token is signed by a forger's
    key (same issuer and kid), which jwt_authn must reject with 401."""
    tokens = {
        user: issuer.token(
            user, ttl=3600, **{k: v for k, v in claims.items() if k not in ("iss", "sub")}
        )
        for user, claims in synth.USERS.items()
    }
    tokens[synth.INVALID_USER] = LocalIssuer(synth.ISSUER, kid=issuer.kid).token(
        synth.INVALID_USER, ttl=3600
    )
    return tokens


def _jwt_mode(policy_set: PolicySet, native: bool, issuer: LocalIssuer) -> PolicySet:
    """The set under jwtEnforcement native (a RequestAuthentication trusting ``issuer``, so
    Envoy verifies the real tokens; synth's stand-in tokens count as verified by the
    evaluator) or extauthz (the stand-in Check server verifies the stand-ins)."""
    if not native:
        return with_jwt_enforcement(policy_set, JwtEnforcement.EXTAUTHZ)
    jwtish = policy_set.request_authentications or any(
        rule_extauthz_reason(r) is not None  # reads the end-user JWT
        for p in policy_set.authorization_policies
        for r in p.rules
    )
    if not jwtish:
        return policy_set
    ra = RequestAuthentication(
        namespace=synth.TARGET_NAMESPACE,
        name="end-user",
        selector={"app": synth.TARGET_NAME},
        jwt_rules=(JwtRule(issuer=synth.ISSUER, jwks=issuer.jwks_json()),),
    )
    return with_jwt_enforcement(policy_set, JwtEnforcement.NATIVE, request_authentications=(ra,))


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.ephemeral(synth.TRUST_DOMAIN)


@pytest.fixture(scope="module")
def app() -> Iterator[EchoServer]:
    with EchoServer("api") as server:
        yield server


class Mesh:
    """Clients for every identity (real SVIDs) against one sidecar, connections reused."""

    def __init__(self, ca: CertificateAuthority, directory: Path) -> None:
        self.contexts = {
            identity: client_context(ca, synth.spiffe(*identity), directory)
            for identity in synth.IDENTITIES
            if identity is not None
        }
        self.connections: dict[tuple[Any, ...], SidecarConnection] = {}
        # synth's stand-in token ("alice") -> a real JWT, for jwt_authn (None: sent as is,
        # for the stand-in Check server of jwtEnforcement: extauthz)
        self.tokens: dict[str, str] | None = None

    def send(self, sidecar: StaticSidecar, probe: synth.Probe) -> tuple[int, bytes]:
        if probe.user and self.tokens is not None:
            real = self.tokens[probe.user]
            path = probe.path
            if probe.token_param:
                path = path.replace(
                    f"{synth.TOKEN_PARAM}={probe.user}", f"{synth.TOKEN_PARAM}={real}"
                )
            probe = replace(probe, user=real, path=path)
        key = (sidecar.port(probe.port), probe.identity, probe.sni)
        conn = self.connections.get(key)
        if conn is None:
            context = self.contexts[probe.identity] if probe.identity else None
            conn = SidecarConnection(key[0], context, sni=probe.sni)
            self.connections[key] = conn
        status, body, _ = conn.fetch(probe.method, probe.path, probe.wire_headers())
        return status, body

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()


@pytest.fixture(scope="module")
def mesh(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    clients = Mesh(ca, tmp_path_factory.mktemp("clients"))
    yield clients
    clients.close()


def _sidecar(
    policy_set: PolicySet,
    ca: CertificateAuthority,
    app: EchoServer,
    extauthz_port: int,
    workdir: Path,
    *,
    index_min_rules: int | None = None,
) -> StaticSidecar:
    ports = {p.port: app.port for p in policy_set.workload(synth.TARGET_REF).ports}  # type: ignore[union-attr]
    options = CompileOptions(
        extauthz=Endpoint("127.0.0.1", extauthz_port),
        access_log_path=str(workdir / "access.log"),
        rbac_index_min_rules=index_min_rules,
    )
    return StaticSidecar(policy_set, synth.TARGET_REF, ca, ports, options=options, workdir=workdir)


# Policy sets: (profile, first seed). The test uses the first seed from there whose requests the
# evaluator answers with a real mix of 200/403 (a set that denies everything proves little).
CASES = {
    "native": (synth.Profile(policies=(3, 6)), 100),
    "native-many": (synth.Profile(policies=(5, 8)), 200),
    "jwt-union": (synth.Profile(jwt=True, policies=(3, 6)), 300),
    "custom-and-jwt": (synth.Profile(jwt=True, custom=True, policies=(3, 6)), 400),
    # A RequestAuthentication selects the workload: some requests carry a token that does not
    # verify (in the Authorization header or ?access_token=), which must be a 401 whatever the
    # rules say; "authn-native" has no rule reading the JWT at all.
    "authn-jwt": (synth.Profile(jwt=True, request_authn=True, policies=(3, 6)), 500),
    "authn-native": (synth.Profile(request_authn=True, policies=(3, 6)), 600),
}
PROBES_PER_SET = 110


def _mixed(profile: synth.Profile, start: int) -> tuple[PolicySet, list[synth.Probe]]:
    for seed in range(start, start + 50):
        policy_set = synth.random_policy_set(seed, profile)
        probes = synth.random_probes(
            seed, PROBES_PER_SET, jwt=profile.jwt, invalid=profile.request_authn
        )
        counts = Counter(synth.expected_status(policy_set, p, now=NOW) for p in probes)
        if min(counts[200], counts[403]) >= PROBES_PER_SET // 5:
            return policy_set, probes
    raise AssertionError(f"no seed in {start}..{start + 49} gives a mix of outcomes")


def _keyed_source(rng: random.Random) -> Source:
    """A ``from`` entry the exact-identity index could not take but the prefix index can: a
    namespace, a namespace prefix, a principal prefix or an exact identity, sometimes with
    notPrincipals or a notNamespaces narrowing it."""
    td = synth.TRUST_DOMAIN
    kind = rng.choice(["namespaces", "ns-prefix", "principal-prefix", "exact"])
    values: dict[str, tuple[str, ...]] = {}
    if kind == "namespaces":
        values["namespaces"] = tuple(rng.sample(["shop", "ops", "other"], rng.randint(1, 2)))
    elif kind == "ns-prefix":
        values["namespaces"] = (rng.choice(["sh*", "o*", "oth*"]),)
    elif kind == "principal-prefix":
        values["principals"] = (rng.choice([f"{td}/ns/shop/*", f"{td}/ns/ops/sa/ad*", "clu*"]),)
    else:
        values["principals"] = (rng.choice([f"{td}/ns/shop/sa/web", f"{td}/ns/ops/sa/admin"]),)
    if rng.random() < 0.4:
        values["not_principals"] = (rng.choice([f"{td}/ns/shop/sa/worker", "*/sa/admin"]),)
    elif rng.random() < 0.2:
        values["not_namespaces"] = (rng.choice(["ops", "shop"]),)
    return Source(**values)


def _keyed_set(seed: int) -> PolicySet:
    """A random native policy set whose every rule names callers by namespace or prefix (or
    exactly): all of it goes to the prefix index (meshward.compile.authz.principal_index)."""
    base = synth.random_policy_set(seed, synth.Profile(policies=(3, 6)))
    rng = random.Random(seed)
    policies = [
        dataclasses.replace(
            policy,
            rules=tuple(
                dataclasses.replace(
                    rule, sources=tuple(_keyed_source(rng) for _ in range(rng.choice((1, 1, 2))))
                )
                for rule in policy.rules
            ),
        )
        for policy in base.authorization_policies
    ]
    return PolicySet.create(
        mesh=base.mesh,
        workloads=list(base.workloads),
        authorization_policies=policies,
        peer_authentications=list(base.peer_authentications),
    )


def _mixed_keyed(start: int) -> tuple[PolicySet, list[synth.Probe]]:
    for seed in range(start, start + 50):
        policy_set = _keyed_set(seed)
        probes = synth.random_probes(seed, PROBES_PER_SET)
        counts = Counter(synth.expected_status(policy_set, p, now=NOW) for p in probes)
        if min(counts[200], counts[403]) >= PROBES_PER_SET // 5:
            return policy_set, probes
    raise AssertionError(f"no seed in {start}..{start + 49} gives a mix of outcomes")


def _dry_run_set(seed: int) -> PolicySet:
    """A random native policy set with every other policy in dry-run and a dry-run
    allow-nothing (an ALLOW without rules) beside them: Envoy's shadow verdicts must be the
    evaluator's would_deny (see _shadow_mismatches)."""
    base = synth.random_policy_set(seed, synth.Profile(policies=(4, 7)))
    policies = [
        dataclasses.replace(policy, dry_run=i % 2 == 1 or policy.dry_run)
        for i, policy in enumerate(base.authorization_policies)
    ]
    policies.append(
        AuthorizationPolicy(
            namespace=synth.TARGET_NAMESPACE,
            name="allow-nothing",
            selector={"app": synth.TARGET_NAME},
            dry_run=True,
        )
    )
    return PolicySet.create(
        mesh=base.mesh,
        workloads=list(base.workloads),
        authorization_policies=policies,
        peer_authentications=list(base.peer_authentications),
    )


def _mixed_dry_run(start: int) -> tuple[PolicySet, list[synth.Probe]]:
    """A dry-run set with a mix of outcomes and of would-deny verdicts (dry-run DENY and ALLOW
    policies with rules, and enforced ALLOW policies, so that not every request would be
    denied by the dry-run ALLOW engine)."""
    for seed in range(start, start + 100):
        policy_set = _dry_run_set(seed)
        probes = synth.random_probes(seed, PROBES_PER_SET)
        counts = Counter(synth.expected_status(policy_set, p, now=NOW) for p in probes)
        kinds = Counter(
            (p.action, p.dry_run, bool(p.rules)) for p in policy_set.authorization_policies
        )
        if (
            min(counts[200], counts[403]) >= PROBES_PER_SET // 5
            and kinds[(Action.ALLOW, True, True)]
            and kinds[(Action.DENY, True, True)]
            and kinds[(Action.ALLOW, False, True)]
        ):
            return policy_set, probes
    raise AssertionError(f"no seed in {start}..{start + 99} gives a dry-run mix")


# "+indexed": every rule naming exact callers compiles to RBAC's principal-indexed matcher
# (meshward.compile.authz.principal_index), the form large workloads get. "keyed": every rule names its callers
# by namespace, prefix or identity (with notPrincipals), so it is all in the prefix map.
@pytest.mark.parametrize(
    "case",
    [
        *sorted(CASES),
        "coverage",
        "coverage+indexed",
        "native+indexed",
        "jwt-union+indexed",
        "authn-jwt+indexed",
        # jwtEnforcement: extauthz (the comparison path): JWT rules and tokens in Python
        "jwt-union+extauthz",
        "custom-and-jwt+extauthz",
        "authn-jwt+extauthz",
        "authn-native+extauthz",
        "keyed+indexed",
        "dry-run",
        "dry-run+indexed",
    ],
)
def test_envoy_decides_like_the_evaluator(
    case: str,
    ca: CertificateAuthority,
    app: EchoServer,
    check_server: tuple[CheckServer, int],
    mesh: Mesh,
    tmp_path: Path,
    issuer: LocalIssuer,
    real_tokens: dict[str, str],
) -> None:
    """JWT cases run natively by default: real tokens through Envoy's jwt_authn (invalid ones
    signed by a forger: 401) and RBAC metadata matchers on the verified payload."""
    name, _, variant = case.partition("+")
    native = variant != "extauthz"
    if name == "coverage":
        policy_set = synth.coverage_policy_set()
        probes = synth.random_probes(7, 2 * PROBES_PER_SET)
    elif name == "keyed":
        policy_set, probes = _mixed_keyed(700)
    elif name == "dry-run":
        policy_set, probes = _mixed_dry_run(800)
    else:
        policy_set, probes = _mixed(*CASES[name])
    policy_set = _jwt_mode(policy_set, native, issuer)
    workload = policy_set.workload(synth.TARGET_REF)
    assert workload is not None
    mesh.tokens = real_tokens if native else None
    servicer, extauthz_port = check_server
    servicer.policy_set = policy_set
    calls_before = servicer.calls
    outcomes: Counter[int] = Counter()
    mismatches: list[str] = []
    index_min_rules = 1 if variant == "indexed" else None
    answered: list[synth.Probe] = []
    with _sidecar(
        policy_set, ca, app, extauthz_port, tmp_path, index_min_rules=index_min_rules
    ) as sidecar:
        if variant == "indexed":
            assert "matcher" in json.dumps(sidecar.config)  # the index is really in use
            if name == "keyed":
                assert "prefix_match_map" in json.dumps(sidecar.config)
        for probe in probes:
            want = synth.expected_status(policy_set, probe, now=NOW)
            got, body = mesh.send(sidecar, probe)
            outcomes[got] += 1
            if got:
                answered.append(probe)
            if got != want:
                mismatches.append(f"{probe}: envoy {got} {body[:60]!r}, evaluator {want}")
            # `policy explain` says the same, 401 included (--token-invalid)
            said = explain(
                policy_set,
                workload,
                probe.request(),
                now=NOW,
                custom=synth.custom_provider,
                token_invalid=probe.user == synth.INVALID_USER,
            ).status
            if got and said != got:
                mismatches.append(f"{probe}: envoy {got}, policy explain {said}")
        mesh.close()
        resources = sidecar.resources
        # One Envoy worker, one request at a time: the access log is in request order.
        entries = wait_for_access_log(tmp_path / "access.log", len(answered))
    assert not servicer.errors, servicer.errors[:3]
    assert not mismatches, f"{len(mismatches)} mismatches:\n" + "\n".join(mismatches[:8])
    if native and policy_set.request_authentications:
        assert resources.placement.verifies_jwt_natively  # the jwt_authn filter is in the chain
    if variant != "indexed":  # (the index: see meshward.compile.authz.builder, which rule)
        assert not _misnamed(policy_set, answered, entries)
    if native:  # dry-run rules reading the JWT go to ext_authz under jwtEnforcement: extauthz
        assert not _shadow_mismatches(policy_set, answered, entries)
    assert outcomes[200] and outcomes[403] and outcomes[400], outcomes  # a real mix
    calls = servicer.calls - calls_before
    if policy_set.request_authentications and any(p.user == synth.INVALID_USER for p in probes):
        assert outcomes[401], outcomes
    if native and name != "custom-and-jwt":
        assert not resources.extauthz and calls == 0  # JWT too: Envoy alone decides
    if not resources.extauthz:
        assert calls == 0  # no ext_authz filter at all: Python never sees these requests
    elif not resources.placement.needs_extauthz:
        # Only token verification: exactly the requests carrying a token reach Python.
        with_token = [p for p in probes if p.user and synth.expected_status(policy_set, p) != 400]
        assert calls == len(with_token) > 0
    elif not resources.placement.extauthz_always:
        assert 0 < calls < len(probes)  # the ALLOW union skips ext_authz for native allows


def test_union_decides_natively_first_and_names_policies_in_logs(
    ca: CertificateAuthority,
    app: EchoServer,
    check_server: tuple[CheckServer, int],
    mesh: Mesh,
    tmp_path: Path,
) -> None:
    """One native ALLOW rule, one JWT ALLOW rule, one DENY rule: a native allow never calls
    ext_authz, a JWT-only allow does, a deny names the operator's rule in the access log."""
    web = synth.spiffe("shop", "web").removeprefix("spiffe://")
    policies = [
        AuthorizationPolicy(
            namespace="shop",
            name="web-reads",
            rules=(
                Rule(
                    sources=(Source(principals=(web,)),), operations=(Operation(methods=("GET",)),)
                ),
            ),
        ),
        AuthorizationPolicy(
            namespace="shop",
            name="admins",
            rules=(Rule(sources=(Source(request_principals=(f"{synth.ISSUER}/alice",)),)),),
        ),
        AuthorizationPolicy(
            namespace="shop",
            name="no-admin",
            action=Action.DENY,
            rules=(Rule(operations=(Operation(paths=("/admin*",)),)),),
        ),
    ]
    policy_set = PolicySet.create(
        mesh=MeshConfig(trust_domain=synth.TRUST_DOMAIN, jwt_enforcement=JwtEnforcement.EXTAUTHZ),
        workloads=synth.target_workloads(),
        authorization_policies=policies,
        peer_authentications=[
            PeerAuthentication(namespace="shop", name="default", mode=MtlsMode.STRICT)
        ],
    )
    mesh.tokens = None  # synth's stand-in tokens, verified by the stand-in Check server
    servicer, extauthz_port = check_server
    servicer.policy_set = policy_set

    def probe(
        identity: tuple[str, str], method: str, path: str, user: str | None = None
    ) -> synth.Probe:
        return synth.Probe(
            identity,
            8080,
            method,
            path,
            "api.shop",
            {"x-meshward-principal": "spoofed"},
            None,
            user,
        )

    with _sidecar(policy_set, ca, app, extauthz_port, tmp_path) as sidecar:
        before = servicer.calls
        status, body = mesh.send(sidecar, probe(("shop", "web"), "GET", "/items"))
        assert status == 200 and servicer.calls == before  # native allow: no Check
        echoed = json.loads(body)["headers"]
        assert "x-meshward-principal" not in echoed  # client-sent x-meshward-* stripped
        assert f"URI={synth.spiffe('shop', 'web')}" in echoed["x-forwarded-client-cert"]
        status, _ = mesh.send(sidecar, probe(("ops", "admin"), "POST", "/items", user="alice"))
        assert status == 200 and servicer.calls == before + 1  # only ext_authz could allow it
        status, _ = mesh.send(sidecar, probe(("ops", "admin"), "POST", "/items", user="bob"))
        assert status == 403
        status, body = mesh.send(sidecar, probe(("shop", "web"), "GET", "/admin/x"))
        assert status == 403 and body == b"RBAC: access denied"
        mesh.close()
        log = wait_for_access_log(tmp_path / "access.log", 4)
    denied = [e for e in log if e["response_code"] == 403 and e["path"] == "/admin/x"]
    assert denied[0]["response_code_details"] == (
        "rbac_access_denied_matched_policy[ns[shop]-policy[no-admin]-rule[0]]"
    )
    assert denied[0]["peer_principal"] == synth.spiffe("shop", "web")
    native = next(e for e in log if e["path"] == "/items" and e["method"] == "GET")
    assert native["rbac"]["meshward_native_allow_shadow_engine_result"] == "allowed"
    assert native["rbac"]["meshward_native_allow_shadow_effective_policy_id"] == (
        "ns[shop]-policy[web-reads]-rule[0]"
    )
    assert [e["response_code_details"] for e in log if e["method"] == "POST"] == [
        "via_upstream",
        "ext_authz_denied",
    ]


def test_jwt_rules_are_decided_by_envoy_with_real_tokens(
    ca: CertificateAuthority,
    app: EchoServer,
    check_server: tuple[CheckServer, int],
    mesh: Mesh,
    tmp_path: Path,
    issuer: LocalIssuer,
    real_tokens: dict[str, str],
) -> None:
    """jwtEnforcement native: jwt_authn verifies (a forged token: 401, no token: no request
    principal), RBAC matches the payload's iss/sub, and no request reaches Python. A jwksUri
    whose keys were never fetched verifies nothing (401), fail closed."""
    policies = [
        AuthorizationPolicy(
            namespace="shop",
            name="admins",
            rules=(Rule(sources=(Source(request_principals=(f"{synth.ISSUER}/alice",)),)),),
        ),
    ]

    def policy_set(jwt_rule: JwtRule) -> PolicySet:
        return PolicySet.create(
            mesh=MeshConfig(trust_domain=synth.TRUST_DOMAIN),
            workloads=synth.target_workloads(),
            authorization_policies=policies,
            peer_authentications=[
                PeerAuthentication(namespace="shop", name="default", mode=MtlsMode.STRICT)
            ],
            request_authentications=[
                RequestAuthentication(
                    namespace="shop", name="jwt", selector={"app": "api"}, jwt_rules=(jwt_rule,)
                )
            ],
        )

    servicer, extauthz_port = check_server
    mesh.tokens = real_tokens
    trusted = policy_set(JwtRule(issuer=synth.ISSUER, jwks=issuer.jwks_json()))
    servicer.policy_set = trusted

    def probe(user: str | None) -> synth.Probe:
        return synth.Probe(("ops", "admin"), 8080, "POST", "/items", "api.shop", {}, None, user)

    before = servicer.calls
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with _sidecar(trusted, ca, app, extauthz_port, tmp_path / "a") as sidecar:
        assert not sidecar.resources.extauthz
        results = {user: mesh.send(sidecar, probe(user)) for user in ("alice", "bob", None)}
        forged = mesh.send(sidecar, probe(synth.INVALID_USER))
        # hostile tokens: jwt_authn refuses each with 401 (Istio: present but invalid)
        exp = int(time.time()) + 600
        hostile = {
            "expired": issuer.token("alice", ttl=-3600),
            "unknown issuer": LocalIssuer("https://other.example", kid=issuer.kid).token("alice"),
            "alg none": unsigned_token({"iss": synth.ISSUER, "sub": "alice", "exp": exp}),
            "garbage": "not.a.jwt",
        }
        mesh.tokens = {**real_tokens, **hostile}
        refused = {label: mesh.send(sidecar, probe(label))[0] for label in hostile}
        mesh.close()
        log = wait_for_access_log(tmp_path / "a" / "access.log", 4 + len(hostile))
    assert results["alice"][0] == 200
    echoed = json.loads(results["alice"][1])["headers"]
    assert "authorization" not in echoed  # Istio default: the app never sees the token
    assert results["bob"] == (403, b"RBAC: access denied")
    assert results[None] == (403, b"RBAC: access denied")  # no token: no request principal
    assert forged[0] == 401
    assert refused == dict.fromkeys(hostile, 401)
    assert servicer.calls == before  # Envoy alone decided every request
    details = [e["response_code_details"] for e in log]
    assert details[0] == "via_upstream" and details[1].startswith("rbac_access_denied")
    assert "jwt" in details[3].lower() or "jwt" in json.dumps(log[3]).lower()

    unfetched = policy_set(JwtRule(issuer=synth.ISSUER, jwks_uri="https://idp.invalid/jwks"))
    with _sidecar(unfetched, ca, app, extauthz_port, tmp_path / "b") as sidecar:
        status, _ = mesh.send(sidecar, probe("alice"))
        mesh.close()
    assert status == 401  # no keys fetched: nothing verifies


def _misnamed(
    policy_set: PolicySet, probes: list[synth.Probe], entries: list[dict[str, Any]]
) -> list[str]:
    """RBAC denials whose ``rbac_access_denied_matched_policy[...]`` names another rule than
    meshward.policy.evaluate (``none``: no ALLOW rule matched)."""
    workload = policy_set.workload(synth.TARGET_REF)
    assert workload is not None and len(entries) == len(probes), (len(entries), len(probes))
    out = []
    for probe, entry in zip(probes, entries, strict=True):
        assert entry["method"] == probe.method, (entry, probe)
        details = entry["response_code_details"]
        if not details.startswith("rbac_access_denied_matched_policy["):
            continue
        decision = evaluate(
            policy_set, workload, probe.request(), now=NOW, custom=synth.custom_provider
        )
        if decision.action is Action.CUSTOM and not decision.allowed:
            # Documented residual (meshward.compile.authz.builder): RBAC DENY runs before ext_authz,
            # so a request a native DENY rule and a CUSTOM policy both deny is named by RBAC.
            continue
        named = "none"
        if decision.policy is not None and decision.rule is not None:
            namespace, name = decision.policy.split("/")
            named = rbac_policy_name(namespace, name, decision.rule)
        if details != f"rbac_access_denied_matched_policy[{named}]":
            out.append(f"{probe}: envoy {details}, evaluator {named} ({decision.reason})")
    return out


def _shadow_mismatches(
    policy_set: PolicySet, probes: list[synth.Probe], entries: list[dict[str, Any]]
) -> list[str]:
    """Requests whose dry-run verdict in Envoy's access log (the dry-run DENY and ALLOW shadow
    engines' results) is not the evaluator's: a dry-run DENY engine denies when some dry-run
    DENY policy would deny; the dry-run ALLOW engine (every dry-run ALLOW rule plus the
    enforced ALLOW rules) when each dry-run ALLOW policy would."""
    workload = policy_set.workload(synth.TARGET_REF)
    assert workload is not None
    out = []
    for probe, entry in zip(probes, entries, strict=True):
        rbac = entry["rbac"] if isinstance(entry["rbac"], dict) else {}
        if entry["response_code"] in (400, 401):  # before authorization: no verdict at all
            assert not any(k.startswith(("meshward_dry_run",)) for k in rbac), entry
            continue
        decision = evaluate(
            policy_set, workload, probe.request(), now=NOW, custom=synth.custom_provider
        )
        for action, prefix, combine in (
            (Action.DENY, names.DRY_RUN_DENY_PREFIX, any),
            (Action.ALLOW, names.DRY_RUN_ALLOW_PREFIX, all),
        ):
            verdicts = [r.would_deny for r in decision.dry_run if r.action is action]
            want = combine(verdicts) if verdicts else None
            result = rbac.get(prefix + "shadow_engine_result")
            got = None if result is None else result == "denied"
            if got != want:
                out.append(f"{probe}: {prefix} envoy would_deny={got}, evaluator {want}")
    return out


def test_tcp_port_network_rbac_matches_the_evaluator(
    ca: CertificateAuthority, app: EchoServer, mesh: Mesh, tmp_path: Path
) -> None:
    """A TCP port: ALLOW rules with HTTP fields match nothing, DENY rules drop them (fail
    closed); the evaluator says the same for a request on that port."""
    web = synth.spiffe("shop", "web").removeprefix("spiffe://")
    admin = synth.spiffe("ops", "admin").removeprefix("spiffe://")
    policies = [
        AuthorizationPolicy(
            namespace="shop",
            name="tcp-allow",
            rules=(
                Rule(sources=(Source(namespaces=("shop", "ops")),)),
                # has an HTTP field: matches no TCP connection
                Rule(
                    sources=(Source(principals=("*",)),), operations=(Operation(methods=("GET",)),)
                ),
            ),
        ),
        AuthorizationPolicy(
            namespace="shop",
            name="tcp-deny",
            action=Action.DENY,
            # the path is HTTP-only and dropped on TCP: admin is denied outright
            rules=(
                Rule(
                    sources=(Source(principals=(admin,)),),
                    operations=(Operation(paths=("/secret",)),),
                ),
            ),
        ),
    ]
    policy_set = PolicySet.create(
        mesh=MeshConfig(trust_domain=synth.TRUST_DOMAIN),
        workloads=synth.target_workloads(tcp=True),
        authorization_policies=policies,
        peer_authentications=[
            PeerAuthentication(namespace="shop", name="default", mode=MtlsMode.STRICT)
        ],
    )
    workload = policy_set.workload(synth.TARGET_REF)
    assert workload is not None
    ports = {p.port: app.port for p in workload.ports}
    with StaticSidecar(policy_set, synth.TARGET_REF, ca, ports, workdir=tmp_path) as sidecar:
        results = {}
        for identity in [("shop", "web"), ("ops", "admin"), ("other", "intruder")]:
            context = mesh.contexts[identity]
            request = Request(
                destination_port=synth.TCP_PORT,
                source_principal=synth.spiffe(*identity),
                source_ip="127.0.0.1",
                destination_ip="127.0.0.1",
            )
            want = evaluate(policy_set, workload, request, now=NOW).allowed
            got = _tcp_exchange(sidecar.port(synth.TCP_PORT), context)
            results[identity] = (got, want)
    assert results == {
        ("shop", "web"): (True, True),
        ("ops", "admin"): (False, False),
        ("other", "intruder"): (False, False),
    }
    assert web  # the allowed principal is the web workload


def _tcp_exchange(port: int, context: Any) -> bool:
    """Did bytes make it to the app and back through the TCP proxy?"""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = tls.recv(64)
        except (ConnectionResetError, OSError):
            return False
    return data.startswith(b"HTTP/1.1 200")


def test_spans_reach_otlp_and_the_access_log_names_the_trace(
    ca: CertificateAuthority, app: EchoServer, mesh: Mesh, tmp_path: Path
) -> None:
    """With an OTLP address, the inbound sidecar exports spans (service <name>.<ns>) to the
    meshward-otlp cluster, and each access-log line carries its trace id."""
    from meshward.telemetry.collector import OtlpReceiver

    policy_set = synth.coverage_policy_set()
    ports = {p: app.port for p in synth.HTTP_PORTS}
    with OtlpReceiver() as receiver:
        options = CompileOptions(
            otlp=Endpoint.parse(receiver.endpoint), access_log_path=str(tmp_path / "access.log")
        )
        with StaticSidecar(
            policy_set, synth.TARGET_REF, ca, ports, options=options, workdir=tmp_path
        ) as sidecar:
            web = synth.Probe(("shop", "web"), 8080, "GET", "/items", "api.shop", {}, None, None)
            for _ in range(5):  # Envoy flushes a batch at 5 spans, so no 5 s timer wait
                assert mesh.send(sidecar, web)[0] == 200
            mesh.close()
            spans = receiver.wait_for(
                lambda got: sum(s.service == "api.shop" for s in got) >= 5, timeout=20
            )
            log = wait_for_access_log(tmp_path / "access.log", 5)
    traced = {s.trace_id for s in spans if s.service == "api.shop"}
    logged = {entry["trace_id"] for entry in log}
    assert len(logged) == 5 and logged <= traced


def test_outbound_mtls_presents_own_svid_and_checks_the_peer(
    ca: CertificateAuthority, app: EchoServer, tmp_path: Path
) -> None:
    """The compiled outbound path of shop/web reaches shop/api over mTLS with web's identity;
    pointed at a sidecar with another identity (shop/worker), the SAN check refuses it."""
    import urllib.error
    import urllib.request

    from meshward.compile import (
        Mode,
        PortBinding,
        WorkloadBinding,
        compile_workload,
        static_bootstrap,
    )
    from meshward.envoy import EnvoyProcess
    from meshward.net import free_port
    from meshward.testing.sidecar import workload_secrets

    policy_set = synth.coverage_policy_set(MtlsMode.STRICT)
    ports = {p: app.port for p in synth.HTTP_PORTS}
    api = StaticSidecar(policy_set, synth.TARGET_REF, ca, ports, workdir=tmp_path / "api")
    decoy = StaticSidecar(policy_set, "shop/worker", ca, {8080: app.port}, workdir=tmp_path / "w")

    def client(target_port: int, name: str) -> tuple[EnvoyProcess, int]:
        outbound = free_port()
        bindings = {
            synth.TARGET_REF: WorkloadBinding(
                ports={
                    p: PortBinding(
                        listen=Endpoint("127.0.0.1", target_port if p == 8080 else 1),
                        app=Endpoint("127.0.0.1", 1),
                    )
                    for p in synth.HTTP_PORTS
                }
            ),
            "shop/web": WorkloadBinding(
                ports={
                    8080: PortBinding(Endpoint("127.0.0.1", free_port()), Endpoint("127.0.0.1", 1))
                },
                outbound={f"{synth.TARGET_REF}:8080": Endpoint("127.0.0.1", outbound)},
            ),
        }
        options = CompileOptions(mode=Mode.STATIC, bindings=bindings, access_log_path=None)
        resources = compile_workload(policy_set, "shop/web", options)
        assert "outbound|8080||api.shop" in {c.name for c in resources.clusters}
        secrets = workload_secrets(ca, synth.spiffe("shop", "web"))
        config = static_bootstrap(resources, secrets)
        return EnvoyProcess(config, name=name, workdir=tmp_path / name), outbound

    with api, decoy:
        good, good_port = client(api.port(8080), "web-to-api")
        with good:
            url = f"http://127.0.0.1:{good_port}/items"
            with urllib.request.urlopen(url, timeout=5) as response:
                echoed = json.loads(response.read())
            assert echoed["service"] == "api"
            xfcc = echoed["headers"]["x-forwarded-client-cert"]
            assert f"URI={synth.spiffe('shop', 'web')}" in xfcc
            assert f"By={synth.spiffe('shop', 'api')}" in xfcc
        fooled, fooled_port = client(decoy.port(8080), "web-to-decoy")
        with fooled:
            url = f"http://127.0.0.1:{fooled_port}/items"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=5)
            assert refused.value.code == 503  # TLS to a sidecar that is not shop/api: refused
            stats = fooled.stats("cluster.outbound|8080||api.shop.ssl")
            assert stats.get("cluster.outbound|8080||api.shop.ssl.fail_verify_san", 0) >= 1


def test_envoy_and_the_evaluator_name_the_same_first_matching_rule(
    ca: CertificateAuthority, app: EchoServer, mesh: Mesh, tmp_path: Path
) -> None:
    """Several DENY rules match: real Envoy names the first in string order of the RBAC names
    (``web-2`` before ``web``, ``rule[10]`` before ``rule[2]``), which is what
    meshward.compile.authz.envoy_policy_order predicts, and meshward.policy.evaluate (so
    ``meshward policy explain`` and the ext_authz service) names the same rule: both take the
    order from meshward.policy.ordering."""
    from meshward.compile.authz import envoy_policy_order, place_rules

    get = Rule(operations=(Operation(methods=("GET",)),))
    deny_web = AuthorizationPolicy(
        namespace="shop",
        name="web",
        action=Action.DENY,
        rules=(*(Rule(operations=(Operation(paths=(f"/p{i}",)),)) for i in range(10)), get),
    )
    deny_web2 = AuthorizationPolicy(
        namespace="shop", name="web-2", action=Action.DENY, rules=(get,)
    )
    cases = {"both": [deny_web, deny_web2], "one policy": [deny_web]}
    seen = {}
    for label, policies in cases.items():
        policy_set = PolicySet.create(
            mesh=MeshConfig(trust_domain=synth.TRUST_DOMAIN),
            workloads=synth.target_workloads(),
            authorization_policies=policies,
            peer_authentications=[
                PeerAuthentication(namespace="shop", name="default", mode=MtlsMode.STRICT)
            ],
        )
        workload = policy_set.workload(synth.TARGET_REF)
        assert workload is not None
        probe = synth.Probe(("shop", "web"), 8080, "GET", "/p2", "api.shop", {}, None, None)
        decision = evaluate(policy_set, workload, probe.request(), now=NOW)
        matching = {("shop/web", 2), ("shop/web", 10), ("shop/web-2", 0)}  # GET /p2
        predicted = next(
            r.rbac_name
            for r in envoy_policy_order(place_rules(policy_set.policies_for(workload)))
            if (r.policy.ref, r.index) in matching
        )
        workdir = tmp_path / label.replace(" ", "-")
        ports = {p.port: app.port for p in workload.ports}
        with StaticSidecar(policy_set, synth.TARGET_REF, ca, ports, workdir=workdir) as sidecar:
            status, _ = mesh.send(sidecar, probe)
            mesh.close()
            (entry,) = wait_for_access_log(workdir / "access.log", 1)
        assert status == 403 and not decision.allowed
        seen[label] = (entry["response_code_details"], (decision.policy, decision.rule))
        assert entry["response_code_details"] == f"rbac_access_denied_matched_policy[{predicted}]"
    assert seen == {
        "both": (
            "rbac_access_denied_matched_policy[ns[shop]-policy[web-2]-rule[0]]",
            ("shop/web-2", 0),
        ),
        "one policy": (
            "rbac_access_denied_matched_policy[ns[shop]-policy[web]-rule[10]]",
            ("shop/web", 10),
        ),
    }


def test_indexed_only_allow_on_a_permissive_port(
    ca: CertificateAuthority, app: EchoServer, mesh: Mesh, tmp_path: Path
) -> None:
    """Every ALLOW rule names exact callers and goes to the principal index, the ALLOW filter's
    only engine. The plaintext chain shares the route config: with no peer identity to look up
    the tree matches nothing, so plaintext is denied, as the evaluator says."""
    web = synth.spiffe("shop", "web").removeprefix("spiffe://")
    worker = synth.spiffe("shop", "worker").removeprefix("spiffe://")
    policies = [
        AuthorizationPolicy(
            namespace="shop",
            name="callers",
            rules=(
                Rule(
                    sources=(Source(principals=(web,)),), operations=(Operation(methods=("GET",)),)
                ),
                Rule(sources=(Source(principals=(worker,)),)),
            ),
        )
    ]
    policy_set = PolicySet.create(
        mesh=MeshConfig(trust_domain=synth.TRUST_DOMAIN),
        workloads=synth.target_workloads(),
        authorization_policies=policies,
        peer_authentications=[
            PeerAuthentication(namespace="shop", name="default", mode=MtlsMode.PERMISSIVE)
        ],
    )
    probes = [
        synth.Probe(identity, 8080, method, "/items", "api.shop", {}, None, None)
        for identity in [("shop", "web"), ("shop", "worker"), ("ops", "admin"), None]
        for method in ("GET", "POST")
    ]
    with _sidecar(policy_set, ca, app, 1, tmp_path, index_min_rules=1) as sidecar:
        assert "matcher_tree" in json.dumps(sidecar.config)
        got = {(p.identity, p.method): mesh.send(sidecar, p)[0] for p in probes}
        mesh.close()
    want = {(p.identity, p.method): synth.expected_status(policy_set, p, now=NOW) for p in probes}
    assert got == want
    assert got[(None, "GET")] == 403 and got[(("shop", "web"), "GET")] == 200


CORPUS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "istio-authz"
CORPUS_WORKLOAD = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {ports: [{name: http, port: 8000, protocol: HTTP}]}
"""
# Tokens for the corpus' JWT rules: requestPrincipals without '/' (iss only, empty sub),
# issuer/subject pairs, and the audiences/presenter/nested claims allow-full-rule reads.
CORPUS_TOKENS: dict[str, dict[str, Any]] = {
    "rp1": {"iss": "requestPrincipals1", "sub": ""},
    "rp2": {"iss": "requestPrincipals2", "sub": ""},
    "rp-prefix": {"iss": "requestPrincipals-prefix-x", "sub": "s"},
    "example": {
        "iss": "https://example.com",
        "sub": "alice",
        "aud": ["audiences", "x"],
        "azp": "presenter",
        "nested1": {"nested2": "nested"},
    },
}


@pytest.mark.parametrize("name", ["multiple-policies-in.yaml", "allow-full-rule-in.yaml"])
def test_conformance_jwt_cases_through_envoy(
    name: str,
    ca: CertificateAuthority,
    app: EchoServer,
    check_server: tuple[CheckServer, int],
    mesh: Mesh,
    tmp_path: Path,
) -> None:
    """The Istio corpus files whose rules read the end-user JWT, through real Envoy with
    jwt_authn (real tokens, one provider per issuer; a forged token: 401) against
    meshward.policy.evaluate and `policy explain` (--token-invalid for the 401)."""
    from meshward.policy import parse

    path = CORPUS / name
    if not path.exists():
        pytest.skip(f"{name} not in the corpus")
    issuers = {
        label: LocalIssuer(claims["iss"], kid=f"k-{label}")
        for label, claims in CORPUS_TOKENS.items()
    }
    import yaml

    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs:  # experimental.* keys are refused (tests/conformance checks that)
        for rule in (doc or {}).get("spec", {}).get("rules", []) or []:
            if rule.get("when"):
                rule["when"] = [c for c in rule["when"] if not c["key"].startswith("experimental.")]
    base = parse({"workload.yaml": CORPUS_WORKLOAD, name: yaml.safe_dump_all(docs)})
    ra = RequestAuthentication(
        namespace="foo",
        name="jwt",
        selector={"app": "httpbin"},
        jwt_rules=tuple(JwtRule(issuer=i.issuer, jwks=i.jwks_json()) for i in issuers.values()),
    )
    policy_set = with_jwt_enforcement(base, JwtEnforcement.NATIVE, request_authentications=(ra,))
    workload = policy_set.workload("foo/httpbin")
    assert workload is not None
    tokens = {
        label: issuers[label].token(
            claims["sub"], ttl=3600, **{k: v for k, v in claims.items() if k not in ("iss", "sub")}
        )
        for label, claims in CORPUS_TOKENS.items()
    }
    tokens["forged"] = LocalIssuer("requestPrincipals1", kid="k-rp1").token("", ttl=3600)
    servicer, extauthz_port = check_server
    servicer.policy_set = policy_set
    mesh.tokens = None  # real tokens below
    ports = {8000: app.port}
    options = CompileOptions(
        extauthz=Endpoint("127.0.0.1", extauthz_port),
        access_log_path=str(tmp_path / "access.log"),
    )
    mismatches: list[str] = []
    statuses: Counter[int] = Counter()
    with StaticSidecar(
        policy_set, "foo/httpbin", ca, ports, options=options, workdir=tmp_path
    ) as sidecar:
        for label in [None, *tokens]:
            for method, path_ in (("GET", "/x"), ("PUT", "/v2"), ("PUT", "/x")):
                probe = synth.Probe(
                    ("shop", "web"), 8000, method, path_, "httpbin.foo", {}, None,
                    tokens[label] if label else None,
                )  # fmt: skip
                got, body = mesh.send(sidecar, probe)
                statuses[got] += 1
                claims = CORPUS_TOKENS.get(label) if label else None
                request = replace(probe.request(), claims=dict(claims) if claims else None)
                said = explain(
                    policy_set, workload, request, now=NOW, token_invalid=label == "forged"
                )
                want = 401 if label == "forged" else (200 if said.decision.allowed else 403)
                if got != want or said.status != got:
                    mismatches.append(
                        f"{label} {method} {path_}: envoy {got} {body[:50]!r}, evaluator "
                        f"{want}, explain {said.status} ({said.decision.reason})"
                    )
        mesh.close()
    assert not mismatches, "\n".join(mismatches)
    assert statuses[401] == 3 and statuses[403], statuses
    if name.startswith("multiple"):
        assert statuses[200], statuses  # httpbin-6: requestPrincipals1/2 (or GET: httpbin-1)
