from __future__ import annotations

from meshward.policy import PolicyError, parse
from meshward.policy.errors import MAX_REASON_CHARS, Problem


def test_a_huge_offending_value_is_not_echoed_whole() -> None:
    huge = "x" * 100_000
    text = (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: p, namespace: shop}}\nspec: {{action: {huge}}}\n"
    )
    try:
        parse({"p.yaml": text})
    except PolicyError as err:
        assert all(len(p.reason) < MAX_REASON_CHARS + 50 for p in err.problems)
        assert len(str(err)) < 2_000
        assert any("more characters" in p.reason for p in err.problems)
    else:
        raise AssertionError("an invalid action must be rejected")


def test_short_reasons_are_untouched() -> None:
    assert Problem("f", 1, "spec", "bad").reason == "bad"
