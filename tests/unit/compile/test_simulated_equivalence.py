"""Compiled RBAC + ext_authz gating vs meshward.policy.evaluate, on thousands of generated
requests, through a model of Envoy's filters (meshward.testing.simulate). Fast and broad; the
real-Envoy test (tests/integration/test_compile_equivalence.py) proves the model faithful."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from meshward.compile import CompileOptions, Endpoint, Mode, compile_workload
from meshward.compile.workload import to_dict
from meshward.policy import Request, evaluate
from meshward.policy.model import JwtEnforcement, MtlsMode
from meshward.policy.policyset import PolicySet
from meshward.testing import simulate, synth

NOW = datetime(2030, 1, 1, tzinfo=UTC)
RUNTIME = {8080: 18080, 9090: 19090, 7000: 17000}


def _options(index_min_rules: int | None = 16) -> CompileOptions:
    from meshward.compile import PortBinding, WorkloadBinding

    binding = WorkloadBinding(
        ports={
            p: PortBinding(listen=Endpoint("127.0.0.1", r), app=Endpoint("127.0.0.1", 1))
            for p, r in RUNTIME.items()
        }
    )
    return CompileOptions(
        mode=Mode.STATIC,
        bindings={synth.TARGET_REF: binding},
        extauthz=Endpoint("127.0.0.1", 9191),
        outbound=False,
        rbac_index_min_rules=index_min_rules,
    )


def _extauthz(policy_set):  # type: ignore[no-untyped-def]
    workload = policy_set.workload(synth.TARGET_REF)
    verifies = bool(policy_set.request_authentications_for(workload))

    def check(conn: simulate.Connection, path: str, context: Mapping[str, str]) -> bool | int:
        assert context["workload"] == synth.TARGET_REF
        user = synth.token_in(conn.headers, conn.path)
        if verifies and user is not None and user not in synth.USERS:
            return 401
        request = Request(
            method=conn.method,
            path=path,
            host=conn.host,
            destination_port=int(context["port"]),
            source_principal=conn.peer_uri,
            source_ip=conn.source_ip,
            remote_ip=conn.remote_ip if "x-forwarded-for" in conn.headers else None,
            destination_ip=conn.destination_ip,
            headers=dict(conn.headers),
            claims=dict(synth.USERS[user]) if user in synth.USERS else None,
            sni=conn.sni,
        )
        return evaluate(
            policy_set, workload, request, now=NOW, custom=synth.custom_provider
        ).allowed

    return check


def _jwt(
    conn: simulate.Connection, config: Mapping[str, object]
) -> Mapping[str, object] | bool | None:
    """jwt_authn with synth's tokens at Istio's default locations: "Bearer alice" verifies to
    alice's claims, an unknown user is a token that does not verify (401)."""
    assert config["providers"], "a jwt_authn filter with no provider"
    user = synth.token_in(conn.headers, conn.path)
    if user is None:
        return None
    return synth.USERS.get(user, False)


def _listeners(policy_set, index_min_rules=16):  # type: ignore[no-untyped-def]
    options = _options(index_min_rules)
    resources = compile_workload(policy_set, synth.TARGET_REF, options, now=NOW)
    by_port = {}
    for listener in resources.listeners:
        as_dict = to_dict(listener)
        by_port[as_dict["address"]["socket_address"]["port_value"]] = as_dict
    return by_port


PROFILES = {
    "native": synth.Profile(),
    "jwt": synth.Profile(jwt=True),
    "custom": synth.Profile(jwt=True, custom=True),
    "audit": synth.Profile(audit=True, policies=(2, 8)),
    # A RequestAuthentication: tokens (some invalid, some in the query) go to ext_authz first.
    "authn": synth.Profile(jwt=True, request_authn=True),
    "authn-native": synth.Profile(request_authn=True),
}


def _with_enforcement(
    policy_set: PolicySet, enforcement: JwtEnforcement, profile: synth.Profile
) -> PolicySet:
    """The set under ``enforcement``. synth's tokens count as verified in every JWT profile
    (its stand-in Check server verifies them); natively only a RequestAuthentication makes
    Envoy verify a token, so JWT profiles get one."""
    authns = policy_set.request_authentications
    if enforcement is JwtEnforcement.NATIVE and profile.jwt and not authns:
        authns = (synth.request_authentication(),)
    return PolicySet.create(
        mesh=replace(policy_set.mesh, jwt_enforcement=enforcement),
        workloads=policy_set.workloads,
        authorization_policies=policy_set.authorization_policies,
        peer_authentications=policy_set.peer_authentications,
        request_authentications=authns,
    )


@pytest.mark.parametrize("enforcement", list(JwtEnforcement), ids=lambda e: f"jwt-{e.value}")
@pytest.mark.parametrize("indexed", [False, True], ids=["rules", "indexed"])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_simulated_envoy_decides_like_the_evaluator(
    profile: str, indexed: bool, enforcement: JwtEnforcement
) -> None:
    """``indexed``: every rule naming exact callers goes to the principal-indexed matcher.
    ``enforcement``: JWT rules as jwt_authn + RBAC (native, the default) or in ext_authz."""
    native_jwt = enforcement is JwtEnforcement.NATIVE
    if not native_jwt and not (PROFILES[profile].jwt or PROFILES[profile].request_authn):
        pytest.skip("no JWT in this profile: both settings compile the same")
    mismatches: list[str] = []
    called = 0
    total = 0
    statuses: Counter[int] = Counter()
    authn = PROFILES[profile].request_authn
    token_calls = 0
    for seed in range(100):
        policy_set = _with_enforcement(
            synth.random_policy_set(seed, PROFILES[profile]), enforcement, PROFILES[profile]
        )
        listeners = _listeners(policy_set, 1 if indexed else None)
        check = _extauthz(policy_set)
        for probe in synth.random_probes(seed, 60, jwt=PROFILES[profile].jwt, invalid=authn):
            conn = simulate.Connection(
                method=probe.method,
                path=probe.path,
                host=probe.host,
                headers={k.lower(): v for k, v in probe.wire_headers().items() if k != "Host"},
                port=RUNTIME[probe.port],
                peer_uri=probe.principal,
                sni=probe.sni,
            )
            outcome = simulate.run(listeners[RUNTIME[probe.port]], conn, check, _jwt)
            want = synth.expected_status(policy_set, probe, now=NOW)
            total += 1
            called += outcome.extauthz_called
            statuses[outcome.status] += 1
            if probe.user and want != 400:
                token_calls += 1
            if outcome.status != want:
                mismatches.append(f"seed {seed}: {probe} -> envoy {outcome.status}, want {want}")
    assert not mismatches, "\n".join(mismatches[:10])
    if profile == "native" or (native_jwt and profile != "custom"):
        # Python is never consulted when every rule is native (JWT rules included: jwt_authn)
        assert called == 0
    elif profile == "custom":
        assert called > 0
    elif profile == "jwt":
        assert 0 < called < total  # the ALLOW union keeps some requests off ext_authz
    elif profile == "authn-native":
        assert called == token_calls > 0  # exactly the requests carrying a token
    if authn:
        assert statuses[401] > 0, statuses


def test_plaintext_rules_under_strict_never_reach_rbac() -> None:
    """Under STRICT the plaintext chain does not exist: the compiled listener has one chain."""
    policy_set = synth.random_policy_set(3, synth.Profile(mtls=MtlsMode.STRICT))
    for listener in _listeners(policy_set).values():
        assert [c.get("name") for c in listener["filter_chains"]] == ["mtls"]
