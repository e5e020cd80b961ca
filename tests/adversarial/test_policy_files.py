"""Hostile policy files: YAML bombs, huge files, deep nesting, absurd scalars. Each is refused
with a reason naming the file, quickly, and never with an exception other than PolicyError (the
control plane and ext_authz watchers turn PolicyError into "rejected, old version stays"; any
other exception would be a crash or a silent stall)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshward.policy import PolicyError, load, parse
from meshward.policy.yamlsafe import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES

POLICY_HEAD = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
"""


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """The classic: each anchor is a list of ``width`` aliases of the previous one."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        aliases = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"l{level}: &l{level} [{aliases}]")
    return "\n".join(lines) + "\n"


def work_bomb(rules: int, values: int) -> str:
    """Flat and valid-looking: ``rules`` aliases of one rule whose condition lists ``values``
    strings, so validation, hashing and compilation would each walk rules x values items."""
    items = ", ".join(f'"v{i}"' for i in range(values))
    return (
        POLICY_HEAD
        + "  rules:\n"
        + f"  - &rule {{when: [{{key: 'request.headers[x-a]', values: [{items}]}}]}}\n"
        + "  - *rule\n" * (rules - 1)
    )


def rejected(texts: dict[str, str], within: float = 5.0) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(PolicyError) as caught:
        parse(texts)
    took = time.monotonic() - started
    assert took < within, f"took {took:.1f}s"
    return str(caught.value), took


@pytest.mark.parametrize("where", ["top level", "spec.rules"])
def test_billion_laughs_is_refused(where: str) -> None:
    bomb = billion_laughs()
    if where == "top level":
        text = bomb
    else:
        indented = "".join(f"  x-{line}\n" for line in bomb.splitlines())
        text = POLICY_HEAD + indented.replace("  x-l9: &l9", "  rules: &l9")
    message, _ = rejected({"bomb.yaml": text})
    assert "bomb.yaml" in message and "anchors and aliases" in message


def test_an_alias_work_bomb_is_refused_before_anything_walks_it() -> None:
    message, _ = rejected({"rules.yaml": work_bomb(rules=3000, values=3000)})
    assert f"more than {MAX_NODES:,} YAML nodes" in message


def test_modest_aliasing_still_loads() -> None:
    """Anchors are legitimate YAML (people share a rule between policies)."""
    policy_set = parse({"shared.yaml": work_bomb(rules=50, values=20)})
    assert len(policy_set.authorization_policies[0].rules) == 50


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deeply_nested_documents_are_refused(opener: str) -> None:
    depth = 10_000
    if opener == "- ":
        text = "".join("  " * i + "- \n" for i in range(200)) + "  " * 200 + "x\n"
    else:
        text = opener * depth + "1" + ("]" if opener == "[" else "}") * depth
    message, _ = rejected({"deep.yaml": text})
    assert "deep.yaml" in message and f"nested deeper than {MAX_DEPTH} levels" in message


def test_a_deeply_nested_inline_jwks_is_refused() -> None:
    text = (
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: r, namespace: shop}\n"
        f"spec: {{jwtRules: [{{issuer: x, jwks: '{'[' * 100_000}'}}]}}\n"
    )
    message, _ = rejected({"jwks.yaml": text})
    assert "jwks.yaml#1 spec.jwtRules[0].jwks" in message


def test_a_10mb_file_is_refused_without_being_parsed(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    one = POLICY_HEAD.replace("name: p,", "name: p{i},") + "  rules: [{}]\n---\n"
    chunk = "".join(one.replace("{i}", str(i)) for i in range(100))
    big.write_text(chunk * (10 * 1024 * 1024 // len(chunk) + 1))
    assert big.stat().st_size > 10 * 1024 * 1024
    started = time.monotonic()
    with pytest.raises(PolicyError) as caught:
        load([tmp_path])
    assert time.monotonic() - started < 1.0
    assert f"big.yaml: file larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB" in str(caught.value)
    # The same text handed to parse() directly (no file) is refused as well.
    rejected({"big.yaml": big.read_text()}, within=1.0)


def test_a_file_that_never_ends_is_read_only_up_to_the_limit(tmp_path: Path) -> None:
    """/dev/zero named as a policy file: read at most MAX_FILE_BYTES + 1 bytes, then refused."""
    with pytest.raises(PolicyError) as caught:
        load(["/dev/zero"])
    assert "file larger than" in str(caught.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", "1" * 5000),  # int() of >4300 digits raises ValueError in Python 3.11
        ("port", "'" + "1" * 5000 + "'"),
        ("port", "'²'"),  # str.isdigit() but not int()-able
        ("port", "'٣'"),  # an Arabic-Indic digit: isdigit() and int() == 3
        ("port", "1e400"),
        ("port", ".nan"),
    ],
)
def test_absurd_scalars_are_problems_not_crashes(field: str, value: str) -> None:
    text = (
        "apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {name: w, namespace: shop}\n"
        f"spec: {{ports: [{{name: http, {field}: {value}}}]}}\n"
    )
    message, _ = rejected({"w.yaml": text})
    assert "w.yaml#1" in message


@pytest.mark.parametrize(
    "key", ["destination.port", "request.headers[x]", "source.ip", "request.auth.claims[a]"]
)
def test_absurd_condition_values_are_problems_not_crashes(key: str) -> None:
    text = POLICY_HEAD + f"  rules: [{{when: [{{key: '{key}', values: ['²', '{'9' * 5000}']}}]}}]\n"
    try:
        parse({"c.yaml": text})
    except PolicyError as exc:
        assert "c.yaml#1" in str(exc)


def test_a_policy_directory_of_hostile_files_reports_each_of_them(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    (tmp_path / "deep.yaml").write_text("[" * 5000)
    (tmp_path / "big.yaml").write_text("#" * (MAX_FILE_BYTES + 1))
    (tmp_path / "port.yaml").write_text(
        "apiVersion: meshward.dev/v1\nkind: Workload\nmetadata: {name: w, namespace: shop}\n"
        f"spec: {{ports: [{{name: http, port: {'7' * 30}}}]}}\n"
    )
    with pytest.raises(PolicyError) as caught:
        load([tmp_path])
    assert {Path(p.file).name for p in caught.value.problems} == {"big.yaml"}  # unreadable first
    (tmp_path / "big.yaml").unlink()
    with pytest.raises(PolicyError) as caught:
        load([tmp_path])
    files = {Path(p.file).name for p in caught.value.problems}
    assert files == {"bomb.yaml", "deep.yaml", "port.yaml"}
