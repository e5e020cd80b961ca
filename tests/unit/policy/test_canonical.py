"""The version is the SHA-256 of the canonical form: key order, whitespace, file split and
document order do not change it; the canonical YAML loads back to the same version."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshward.policy import (
    Action,
    AuthorizationPolicy,
    Condition,
    JwtHeader,
    JwtRule,
    MeshConfig,
    MtlsMode,
    Operation,
    PeerAuthentication,
    PolicySet,
    Protocol,
    RequestAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
    parse,
)

name = st.from_regex(r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
word = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,8}", fullmatch=True)


def _pattern(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(base, base.map(lambda s: s + "*"), base.map(lambda s: "*" + s), st.just("*"))


patterns = st.lists(_pattern(word), max_size=3).map(tuple)
principal = st.tuples(name, name).map(lambda t: f"cluster.local/ns/{t[0]}/sa/{t[1]}")
cidrs = st.lists(
    st.sampled_from(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "0.0.0.0/0"]),
    max_size=2,
).map(tuple)
paths = st.lists(
    st.one_of(
        st.from_regex(r"/[a-z]{1,5}(/[a-z]{1,5})?", fullmatch=True),
        st.from_regex(r"/[a-z]{1,5}/", fullmatch=True).map(lambda s: s + "*"),
        st.sampled_from(["*", "*.json", "/users/{*}/x", "/static/{**}"]),
    ),
    max_size=3,
).map(tuple)
ports = st.lists(st.integers(1, 65535), max_size=2).map(tuple)

sources = st.builds(
    Source,
    principals=st.lists(st.one_of(principal, _pattern(word)), max_size=2).map(tuple),
    not_principals=st.lists(principal, max_size=1).map(tuple),
    request_principals=patterns,
    not_request_principals=patterns,
    namespaces=st.lists(_pattern(name), max_size=2).map(tuple),
    not_namespaces=st.lists(name, max_size=1).map(tuple),
    ip_blocks=cidrs,
    not_ip_blocks=cidrs,
    remote_ip_blocks=cidrs,
    not_remote_ip_blocks=cidrs,
).filter(lambda s: any(getattr(s, f) for f in s.__dataclass_fields__))
operations = st.builds(
    Operation,
    hosts=patterns,
    not_hosts=patterns,
    ports=ports,
    not_ports=ports,
    methods=st.lists(st.sampled_from(["GET", "POST", "PUT", "DELETE", "P*"]), max_size=2).map(
        tuple
    ),
    not_methods=st.lists(st.sampled_from(["GET", "DELETE"]), max_size=1).map(tuple),
    paths=paths,
    not_paths=paths,
).filter(lambda o: any(getattr(o, f) for f in o.__dataclass_fields__))


def _condition() -> st.SearchStrategy[Condition]:
    def build(key: str, values: tuple[str, ...], not_values: tuple[str, ...]) -> Condition:
        return Condition(key=key, values=values, not_values=not_values)

    ip_values = st.lists(st.sampled_from(["10.0.0.1", "10.0.0.0/24"]), max_size=2).map(tuple)
    port_values = st.lists(st.integers(1, 65535).map(str), max_size=2).map(tuple)
    string_keys = st.sampled_from(
        [
            "request.headers[x-team]",
            "source.namespace",
            "source.principal",
            "request.auth.principal",
            "request.auth.audiences",
            "request.auth.presenter",
            "request.auth.claims[groups]",
            "request.auth.claims[org][team]",
            "connection.sni",
        ]
    )
    return st.one_of(
        st.builds(build, string_keys, patterns, patterns),
        st.builds(
            build,
            st.sampled_from(["source.ip", "remote.ip", "destination.ip"]),
            ip_values,
            ip_values,
        ),
        st.builds(build, st.just("destination.port"), port_values, port_values),
    ).filter(lambda c: bool(c.values or c.not_values))


rules = st.builds(
    Rule,
    sources=st.lists(sources, max_size=2).map(tuple),
    operations=st.lists(operations, max_size=2).map(tuple),
    conditions=st.lists(_condition(), max_size=2).map(tuple),
)
labels = st.dictionaries(st.sampled_from(["app", "version", "tier"]), name, max_size=2)
selectors = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["app", "version", "tier"]), name, min_size=1, max_size=2),
)
times = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
)


@st.composite
def authorization_policies(draw: st.DrawFn) -> AuthorizationPolicy:
    action = draw(st.sampled_from(list(Action)))
    return AuthorizationPolicy(
        namespace=draw(name),
        name=draw(name),
        action=action,
        selector=draw(selectors),
        rules=tuple(draw(st.lists(rules, max_size=3))),
        provider=draw(name) if action is Action.CUSTOM else None,
        dry_run=draw(st.booleans()) if action is not Action.CUSTOM else False,
        expires_at=draw(times),
    )


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    port_numbers = draw(st.lists(st.integers(1, 65535), unique=True, max_size=3))
    return Workload(
        namespace=draw(name),
        name=draw(name),
        labels=draw(labels),
        service_account=draw(st.one_of(st.just(""), name)),
        address=draw(st.sampled_from(["127.0.0.1", "10.0.0.9", "::1"])),
        ports=tuple(
            WorkloadPort(name=f"p{i}", port=p, protocol=draw(st.sampled_from(list(Protocol))))
            for i, p in enumerate(port_numbers)
        ),
    )


@st.composite
def peer_authentications(draw: st.DrawFn) -> PeerAuthentication:
    selector = draw(selectors)
    port_level = (
        draw(st.dictionaries(st.integers(1, 65535), st.sampled_from(list(MtlsMode)), max_size=2))
        if selector
        else {}
    )
    return PeerAuthentication(
        namespace=draw(name),
        name=draw(name),
        selector=selector,
        mode=draw(st.sampled_from(list(MtlsMode))),
        port_level=port_level,
    )


jwt_rules = st.builds(
    JwtRule,
    issuer=st.from_regex(r"https://[a-z]{1,6}\.example", fullmatch=True),
    audiences=st.lists(name, max_size=2).map(tuple),
    jwks_uri=st.just("https://keys.example/jwks.json"),
    jwks=st.one_of(st.none(), st.just('{"keys": []}')),
    from_headers=st.lists(
        st.builds(JwtHeader, name=st.just("x-token"), prefix=st.sampled_from(["", "Bearer "])),
        max_size=1,
    ).map(tuple),
    from_params=st.lists(st.just("token"), max_size=1).map(tuple),
    output_payload_to_header=st.one_of(st.none(), st.just("x-jwt")),
    forward_original_token=st.booleans(),
)


@st.composite
def request_authentications(draw: st.DrawFn) -> RequestAuthentication:
    rules_ = draw(st.lists(jwt_rules, max_size=2, unique_by=lambda r: r.issuer))
    return RequestAuthentication(
        namespace=draw(name), name=draw(name), selector=draw(selectors), jwt_rules=tuple(rules_)
    )


def _key(item: Any) -> tuple[str, str]:
    return (item.namespace, item.name)


policy_sets = st.builds(
    lambda mesh, ws, aps, pas, ras: PolicySet.create(
        mesh=mesh,
        workloads=ws,
        authorization_policies=aps,
        peer_authentications=pas,
        request_authentications=ras,
    ),
    st.builds(
        MeshConfig,
        trust_domain=st.sampled_from(["cluster.local", "example.org"]),
        root_namespace=name,
    ),
    st.lists(workloads(), max_size=3, unique_by=_key),
    st.lists(authorization_policies(), max_size=4, unique_by=_key),
    st.lists(peer_authentications(), max_size=2, unique_by=_key),
    st.lists(request_authentications(), max_size=2, unique_by=_key),
)

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(policy_sets)
def test_canonical_round_trip_keeps_the_version(ps: PolicySet) -> None:
    text = ps.dump()
    again = parse({"canonical.yaml": text})
    assert again.version == ps.version
    assert again.dump() == text
    assert again == ps


def _shuffle_keys(value: Any, rng: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffle_keys(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffle_keys(v, rng) for v in value]
    return value


@FAST
@given(policy_sets, st.integers(0, 2**32), st.integers(1, 4), st.booleans())
def test_key_order_whitespace_and_file_split_do_not_change_the_version(
    ps: PolicySet, seed: int, files: int, flow: bool
) -> None:
    rng = random.Random(seed)
    docs = [_shuffle_keys(d, rng) for d in ps.canonical_documents()]
    rng.shuffle(docs)
    texts: dict[str, list[dict[str, Any]]] = {f"f{i}.yaml": [] for i in range(files)}
    for doc in docs:
        texts[f"f{rng.randrange(files)}.yaml"].append(doc)
    rendered = {
        name: yaml.safe_dump_all(
            items, sort_keys=False, default_flow_style=flow, indent=rng.choice([2, 4])
        )
        for name, items in texts.items()
    }
    assert parse(rendered).version == ps.version


def test_version_is_sha256_hex_and_semantic_changes_change_it() -> None:
    base = {
        "w.yaml": "apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {name: a, namespace: x}\n",
        "p.yaml": "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: x}\nspec: {rules: [{to: [{operation: {methods: [GET]}}]}]}\n",
    }
    v = parse(base).version
    assert len(v) == 64 and int(v, 16) >= 0
    changed = dict(base, **{"p.yaml": base["p.yaml"].replace("GET", "POST")})
    assert parse(changed).version != v
    # defaults spelled out, comments, unknown annotations and kubectl fields: same version
    explicit = dict(
        base,
        **{
            "w.yaml": "# a comment\napiVersion: meshward.dev/v1\nkind: Workload\nmetadata:\n"
            "  name: a\n  namespace: x\n  uid: '42'\n  annotations: {note: hi}\n"
            "spec:\n  serviceAccount: a\n  address: 127.0.0.1\n",
            "m.yaml": "apiVersion: meshward.dev/v1\nkind: MeshConfig\n"
            "spec: {trustDomain: cluster.local, rootNamespace: meshward-system}\n",
            "p.yaml": base["p.yaml"].replace("spec: {", "spec: {action: ALLOW, "),
        },
    )
    assert parse(explicit).version == v


def test_canonical_form_is_json_with_sorted_keys() -> None:
    from meshward.policy.canonical import canonical_bytes

    ps = parse({"w.yaml": "apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {name: a}\n"})
    payload = json.loads(canonical_bytes(ps.canonical_documents()))
    assert payload["format"] == "meshward.policy/v1"
    assert [d["kind"] for d in payload["documents"]] == ["MeshConfig", "Workload"]
