"""Envoy's limits on what the compiler emits are checked before anything is served."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshward.compile import CompileOptions, compile_workload
from meshward.compile.envoy_limits import (
    check_policy_set,
    check_resources,
    policy_problems,
    program_size,
    regex_problem,
)
from meshward.envoy.runtime import MAX_RE2_PROGRAM_SIZE, re2_runtime
from meshward.policy import PolicyError, parse
from meshward.policy.paths import path_template_regex
from meshward.policy_watch import PolicyCheck, PolicyWatcher

ROOT = Path(__file__).resolve().parents[3]

WORKLOAD = """
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: orders, namespace: shop, labels: {app: orders}}
spec: {ports: [{port: 8080}]}
"""


def deny(*paths: str, field: str = "paths") -> str:
    quoted = ", ".join(f'"{p}"' for p in paths)
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: orders-deny, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: orders}}}}
  action: DENY
  rules:
    - from: [{{source: {{principals: ["cluster.local/ns/shop/sa/frontend"]}}}}]
      to: [{{operation: {{{field}: [{quoted}]}}}}]
"""


LONG = "/x/" + "/".join(["{*}"] * 40) + "/y"


def test_program_size_is_the_number_envoy_reports() -> None:
    # Envoy 1.40: "RE2 program size of 408 > max program size of 100" for this path
    # (tests/integration/test_enforced.py checks it against the real binary).
    assert program_size(path_template_regex(LONG)) == 408
    assert program_size("/orders/42") is not None
    assert program_size("(") is None
    assert regex_problem("(") is not None
    assert regex_problem("/orders/.*") is None


def test_the_issue_repro_is_refused_with_file_document_and_field() -> None:
    texts = {"w.yaml": WORKLOAD, "deny.yaml": deny("/orders/42", LONG)}
    problems = policy_problems(parse(texts))
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.file, problem.index) == ("deny.yaml", 1)
    assert problem.field == "spec.rules[0].to[0].operation.paths[1]"
    assert "408" in problem.reason and str(MAX_RE2_PROGRAM_SIZE) in problem.reason
    with pytest.raises(PolicyError) as caught:
        check_policy_set(parse(texts))
    assert "deny.yaml#1 spec.rules[0].to[0].operation.paths[1]" in str(caught.value)


def test_not_paths_and_the_indexed_query_tail_count_too() -> None:
    # A template just under the limit as a url_path regex goes over once the principal index
    # adds its query tail: whichever form the compiler picks must pass.
    sizes = {
        n: program_size(path_template_regex("/a/" + "/".join(["{*}"] * n))) for n in range(1, 12)
    }
    n = max(k for k, v in sizes.items() if v is not None and v <= MAX_RE2_PROGRAM_SIZE)
    path = "/a/" + "/".join(["{*}"] * n)
    problems = policy_problems(parse({"w.yaml": WORKLOAD, "d.yaml": deny(path, field="notPaths")}))
    assert [p.field for p in problems] == ["spec.rules[0].to[0].operation.notPaths[0]"]


def test_examples_pass() -> None:
    from meshward.policy import load

    assert policy_problems(load([ROOT / "examples"])) == []


def test_compiled_resources_backstop() -> None:
    ok = compile_workload(parse({"w.yaml": WORKLOAD}), "shop/orders", CompileOptions())
    check_resources(ok)
    bad = compile_workload(
        parse({"w.yaml": WORKLOAD, "d.yaml": deny(LONG)}), "shop/orders", CompileOptions()
    )
    with pytest.raises(ValueError, match="408"):
        check_resources(bad)


def test_bootstraps_pin_the_limit() -> None:
    layer = re2_runtime()["layers"][0]["static_layer"]
    assert layer == {"re2.max_program_size.error_level": MAX_RE2_PROGRAM_SIZE}


@pytest.mark.parametrize("cached", [False, True])
def test_watcher_refuses_a_set_envoy_would_refuse(tmp_path: Path, cached: bool) -> None:
    (tmp_path / "w.yaml").write_text(WORKLOAD)
    errors: list[PolicyError] = []
    check = PolicyCheck() if cached else check_policy_set
    watcher = PolicyWatcher([tmp_path], check=check, on_error=errors.append)
    first = watcher.load_initial()
    (tmp_path / "d.yaml").write_text(deny("/orders/42", LONG))
    assert not watcher.poll_once()  # seen, waiting for it to hold still
    assert not watcher.poll_once()  # loaded and refused
    assert watcher.current is first
    assert errors and "paths[1]" in str(errors[0])
    (tmp_path / "d.yaml").write_text(deny("/orders/42"))
    watcher.poll_once()
    assert watcher.poll_once()
    assert watcher.current is not first and watcher.last_error is None


def test_sizes_follow_envoy_not_utf8_expansion() -> None:
    # Envoy measures bytes as Latin-1: '.' and '[^/]' cost one range, so a 60-letter namespace
    # prefix (85) passes; measured as UTF-8 it would be 103 and refused for nothing.
    assert program_size("spiffe://[^/]+/ns/" + "n" * 60 + "[^/]*/.*") == 85
    namespaces = deny("/x").replace(
        'principals: ["cluster.local/ns/shop/sa/frontend"]', 'namespaces: ["' + "n" * 60 + '*"]'
    )
    assert policy_problems(parse({"w.yaml": WORKLOAD, "d.yaml": namespaces})) == []


def test_a_long_exact_path_passes_even_in_the_principal_index() -> None:
    """The index matches an exact path with string matchers (no regex), so its length does
    not matter; a long suffix there is a regex and is refused."""
    long_exact = "/" + "p" * 300
    assert policy_problems(parse({"w.yaml": WORKLOAD, "d.yaml": deny(long_exact)})) == []
    ps = parse({"w.yaml": WORKLOAD, "d.yaml": deny(long_exact)})
    options = CompileOptions(rbac_index_min_rules=1)
    check_resources(compile_workload(ps, "shop/orders", options))
    long_suffix = "*" + "p" * 300
    problems = policy_problems(parse({"w.yaml": WORKLOAD, "d.yaml": deny(long_suffix)}))
    assert [p.field for p in problems] == ["spec.rules[0].to[0].operation.paths[0]"]


def test_the_size_cache_is_bounded_under_a_flood_of_patterns() -> None:
    program_size.cache_clear()
    for i in range(6000):
        program_size(f"/flood/{i}/.*")
    assert program_size.cache_info().currsize <= 4096


def test_the_cached_check_refuses_what_the_full_check_refuses_checking_each_policy_once() -> None:
    other = deny("/orders/1").replace("orders-deny", "orders-deny-1")
    texts = {"w.yaml": WORKLOAD, "ok.yaml": other, "d.yaml": deny("/orders/42", LONG)}
    bad = parse(texts)
    check = PolicyCheck()
    with pytest.raises(PolicyError) as full:
        check_policy_set(bad)
    with pytest.raises(PolicyError) as cached:
        check(bad)
    assert cached.value.problems == full.value.problems
    fixed = parse({**texts, "d.yaml": deny("/orders/42")})
    check(fixed)
    kept = dict(check._seen)
    check(fixed)  # the same policy objects: nothing checked again
    assert all(check._seen[k][1] is kept[k][1] for k in kept) and len(kept) == 2
