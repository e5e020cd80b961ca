"""ParseCache: a parse that reuses unchanged files' documents gives the set (and version) a
full parse gives, re-parses only the files that changed, and stays bounded by the file set."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshward.policy import PolicyError, parse
from meshward.policy.loader import ParseCache

WORKLOADS = "\n---\n".join(
    f"""apiVersion: meshward.dev/v1
kind: Workload
metadata: {{name: svc{i}, namespace: ns{i % 3}, labels: {{app: svc{i}}}}}
spec: {{ports: [{{name: http, port: 8080, protocol: HTTP}}]}}"""
    for i in range(6)
)
MESH = """apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh, namespace: meshward-system}
spec: {trustDomain: %s}
"""
POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p%d, namespace: ns%d}
spec:
  selector: {matchLabels: {app: svc%d}}
  action: %s
  rules: [{from: [{source: {principals: ["%s/ns/ns0/sa/svc0"]}}], to: [{operation: {methods: [%s]}}]}]
"""
INVALID = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: [x]}\n"


def _policy(i: int, action: str, method: str, domain: str) -> str:
    return POLICY % (i, i % 3, i % 6, action, domain, method)


def _texts(edits: dict[str, str]) -> dict[str, str]:
    texts = {"a-workloads.yaml": WORKLOADS, "b-mesh.yaml": MESH % "example.org"}
    texts.update({f"p{i}.yaml": _policy(i, "ALLOW", "GET", "example.org") for i in range(4)})
    texts.update(edits)
    return {k: v for k, v in texts.items() if v}


def _outcome(texts: dict[str, str], cache: ParseCache | None) -> object:
    try:
        ps = parse(texts, cache=cache)
    except PolicyError as err:
        return ("error", tuple(err.problems))
    return ("ok", ps.version, ps, ps.warnings)


edit = st.one_of(
    st.tuples(
        st.sampled_from([f"p{i}.yaml" for i in range(6)]),
        st.builds(
            _policy,
            st.integers(0, 5),
            st.sampled_from(["ALLOW", "DENY"]),
            st.sampled_from(["GET", "PUT"]),
            st.sampled_from(["example.org", "other.org"]),
        ),
    ),
    st.tuples(st.sampled_from([f"p{i}.yaml" for i in range(6)]), st.just("")),  # removed
    st.tuples(st.just("p1.yaml"), st.just(INVALID)),
    st.tuples(st.just("b-mesh.yaml"), st.sampled_from([MESH % "other.org", MESH % "x.org"])),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(edit, max_size=3), min_size=1, max_size=5))
def test_cached_parse_equals_a_full_parse_over_random_edits(
    rounds: list[list[tuple[str, str]]],
) -> None:
    cache = ParseCache()
    state: dict[str, str] = {}
    _outcome(_texts(state), cache)
    for changes in rounds:
        state.update(dict(changes))
        texts = _texts(state)
        assert _outcome(texts, cache) == _outcome(texts, None)
        assert set(cache.split) <= set(texts)  # bounded by the file set


def test_a_one_file_edit_parses_only_that_file() -> None:
    cache = ParseCache()
    texts = _texts({})
    parse(texts, cache=cache)
    assert cache.parsed_files == len(texts)
    edited = {**texts, "p2.yaml": _policy(2, "DENY", "PUT", "example.org")}
    ps = parse(edited, cache=cache)
    assert cache.parsed_files == len(texts) + 1
    assert ps.version == parse(edited).version
    assert ps.version != parse(texts).version


def test_an_invalid_file_fails_the_same_with_and_without_the_cache() -> None:
    cache = ParseCache()
    parse(_texts({}), cache=cache)
    bad = _texts({"p1.yaml": INVALID})
    with pytest.raises(PolicyError) as cached:
        parse(bad, cache=cache)
    with pytest.raises(PolicyError) as full:
        parse(bad)
    assert cached.value.problems == full.value.problems
    # and the cache does not keep the failure: fixing the file parses it again
    assert parse(_texts({}), cache=cache).version == parse(_texts({})).version


def test_the_cache_forgets_files_that_left_the_set() -> None:
    cache = ParseCache()
    parse(
        _texts({f"p{i}.yaml": _policy(i, "ALLOW", "GET", "example.org") for i in range(4, 40)}),
        cache=cache,
    )
    assert len(cache.split) == 42
    parse(_texts({}), cache=cache)
    assert set(cache.split) == set(_texts({})) and set(cache.read) == set(_texts({}))
