"""The hardened loader reads the same documents as PyYAML's own safe loader, with libyaml's
parser underneath when PyYAML has it (the control plane's start at fleet scale)."""

from __future__ import annotations

import yaml

from meshward.policy import canonical, yamlsafe
from meshward.policy.errors import Problem
from meshward.testing import topology


def _load(text: str) -> tuple[list[object], list[Problem]]:
    problems: list[Problem] = []
    return [doc for _, doc in yamlsafe.documents("f.yaml", text, problems)], problems


def test_same_documents_as_pyyaml_safe_loader() -> None:
    text = canonical.dump_documents(topology.fleet(40).canonical_documents())
    text += (
        "---\nodd: [1, 0x1f, 1_000, 2.5e3, ~, yes, 'q', \"\\u00e9\", 2026-12-03, &a {k: v}, *a]\n"
    )
    found, problems = _load(text)
    assert problems == []
    assert found == list(yaml.load_all(text, Loader=yaml.SafeLoader))
    assert len(found) > 40


def test_libyaml_parser_is_used_when_pyyaml_has_it() -> None:
    bases = yamlsafe._UniqueKeyLoader.__mro__
    if yaml.__with_libyaml__:
        assert any(b.__name__ == "CParser" for b in bases)
    assert yaml.composer.Composer in bases  # composing (and its limits) stays in Python


def test_limits_hold_with_the_c_parser() -> None:
    assert "nested deeper" in _load("[" * 100_000)[1][0].reason
    assert "duplicate key 'a'" in _load("a: 1\na: 2\n")[1][0].reason
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
        for p, c in zip("abcdefg", "bcdefgh", strict=True)
    )
    assert "YAML bomb" in _load(bomb)[1][0].reason
    assert "line 2" in _load("a: [1\n")[1][0].reason
