"""Istio's own AuthorizationPolicy inputs load unchanged and evaluate as Istio would.

Every file in the corpus (../shared/conformance/istio-authz/, or $MESHWARD_CONFORMANCE_DIR) is
loaded beside a foo/httpbin workload labelled app: httpbin, version: v1. The only refusal
allowed is an ``experimental.*`` when-key, which must be named clearly; the rest of such a file
must then load and evaluate.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshward.policy import Decision, PolicyError, PolicySet, Request, evaluate, parse
from meshward.testing.corpus import conformance_corpus

# A missing corpus fails collection (CorpusMissing), never a silent skip.
CORPUS = conformance_corpus()
FILES = sorted(CORPUS.glob("*.yaml"))
WORKLOAD = """
apiVersion: meshward.dev/v1
kind: Workload
metadata:
  name: httpbin
  namespace: foo
  labels: {app: httpbin, version: v1}
spec:
  ports: [{name: http, port: 8000, protocol: HTTP}]
"""


def _without_experimental(text: str) -> str:
    docs = list(yaml.safe_load_all(text))
    for doc in docs:
        for rule in (doc or {}).get("spec", {}).get("rules", []) or []:
            if rule.get("when"):
                rule["when"] = [c for c in rule["when"] if not c["key"].startswith("experimental.")]
    return yaml.safe_dump_all(docs, sort_keys=False)


def load_corpus_file(path: Path) -> PolicySet:
    """Load a corpus file; experimental.* refusals are checked, then the key is dropped."""
    text = path.read_text()
    try:
        return parse({"workload.yaml": WORKLOAD, path.name: text})
    except PolicyError as exc:
        for problem in exc.problems:
            assert problem.file == path.name and problem.index >= 1
            assert problem.field.endswith(".key"), str(problem)
            assert problem.reason.startswith("unsupported key 'experimental."), str(problem)
        return parse({"workload.yaml": WORKLOAD, path.name: _without_experimental(text)})


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_corpus_file_loads(path: Path) -> None:
    ps = load_corpus_file(path)
    assert ps.authorization_policies
    httpbin = ps.workload("foo/httpbin")
    assert httpbin is not None
    # every policy in the corpus targets foo/httpbin (directly or namespace-wide)
    assert set(ps.policies_for(httpbin)) == set(ps.authorization_policies)
    # a canonical round trip keeps the version
    assert parse({"c.yaml": ps.dump()}).version == ps.version


def test_only_experimental_keys_are_refused() -> None:
    refused = []
    for path in FILES:
        try:
            parse({"workload.yaml": WORKLOAD, path.name: path.read_text()})
        except PolicyError as exc:
            refused.extend(exc.problems)
    assert all("experimental." in p.reason for p in refused)
    assert all(str(p).startswith(f"{p.file}#") for p in refused)


def decide(ps: PolicySet, **overrides: Any) -> Decision:
    base: dict[str, Any] = {
        "method": "PUT",
        "path": "/x",
        "host": "httpbin.foo",
        "destination_port": 8000,
        "source_principal": "spiffe://cluster.local/ns/other/sa/client",
        "source_ip": "10.0.0.1",
        "destination_ip": "127.0.0.1",
    }
    base.update(overrides)
    httpbin = ps.workload("foo/httpbin")
    assert httpbin is not None
    return evaluate(ps, httpbin, Request(**base), now=datetime.now(UTC))


def corpus(name: str) -> PolicySet:
    """A named corpus file; a missing one fails (the corpus changed under the test)."""
    path = CORPUS / name
    assert path.is_file(), f"{name} is not in the corpus at {CORPUS}"
    return load_corpus_file(path)


def test_allow_full_rule() -> None:
    ps = corpus("allow-full-rule-in.yaml")
    my_sa = decide(ps, source_principal="spiffe://cluster.local/ns/my-ns/sa/my-sa")
    assert (my_sa.allowed, my_sa.policy, my_sa.rule) == (True, "foo/httpbin-1", 0)
    # "sa-only" is a service account in the policy's namespace
    assert decide(ps, source_principal="spiffe://cluster.local/ns/foo/sa/sa-only").rule == 0
    assert not decide(ps, source_principal="spiffe://cluster.local/ns/my-ns/sa/my-sa-not").allowed
    # rule 1 demands a principal and forbids every principal ("*" in both): it never matches
    assert not decide(ps).allowed
    assert not decide(ps, source_principal=None).allowed


def test_allow_path_with_star_in_paths_and_not_paths_never_matches() -> None:
    ps = corpus("allow-path-in.yaml")
    for path in ("/exact", "/prefix/x", "/a/suffix", "/path/template/x", "/a/path/template"):
        d = decide(ps, path=path)
        assert not d.allowed and d.policy is None


def test_deny_and_allow() -> None:
    ps = corpus("deny-and-allow-in.yaml")
    d = decide(ps, source_principal="spiffe://deny")
    assert (d.allowed, d.policy) == (False, "foo/httpbin-deny")
    a = decide(ps, source_principal="spiffe://allow")
    assert (a.allowed, a.policy) == (True, "foo/httpbin-allow")
    assert not decide(ps).allowed


def test_dry_run_mix() -> None:
    ps = corpus("dry-run-mix-in.yaml")
    shadowed = decide(ps, path="/allow")
    assert not shadowed.allowed  # only the enforced httpbin-2 counts
    (dry,) = shadowed.dry_run
    assert (dry.policy, dry.matched, dry.would_deny) == ("foo/httpbin-1", True, False)
    enforced = decide(ps, path="/another")
    assert (enforced.allowed, enforced.policy) == (True, "foo/httpbin-2")
    assert not enforced.dry_run[0].would_deny
    neither = decide(ps, path="/none")
    assert not neither.allowed and neither.dry_run[0].would_deny


@pytest.mark.parametrize(
    ("overrides", "policy"),
    [
        ({"method": "GET"}, "foo/httpbin-1"),
        ({"path": "/v2"}, "foo/httpbin-2"),
        ({"host": "HTTPBIN.org"}, "foo/httpbin-3"),
        ({"destination_port": 90}, "foo/httpbin-4"),
        ({"source_principal": "spiffe://principals2"}, "foo/httpbin-5"),
        ({"source_principal": "spiffe://cluster.local/ns/namespaces1/sa/a"}, "foo/httpbin-7"),
        ({"source_ip": "5.6.7.200"}, "foo/httpbin-8"),
        ({"headers": {"x-abc": "abc2"}}, "foo/httpbin-9"),
        ({}, None),
    ],
)
def test_multiple_policies(overrides: dict[str, Any], policy: str | None) -> None:
    d = decide(corpus("multiple-policies-in.yaml"), **overrides)
    assert (d.allowed, d.policy) == (policy is not None, policy), d.reason
