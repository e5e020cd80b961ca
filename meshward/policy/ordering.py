"""Which rule decides when several match: the order Envoy (and Istio) try them in.

Envoy's RBAC rules engine keeps its policies in a ``std::map`` keyed by name and reports the
first matching one in *string* order of those names. Meshward names every rule
``ns[<ns>]-policy[<name>]-rule[<i>]`` (what a denial's
``rbac_access_denied_matched_policy[...]`` shows), so string order is not "policy by policy,
rule by rule": ``rule[10]`` sorts before ``rule[2]``, and policy ``web-2`` before ``web``
('-' < ']'). The evaluator (meshward.policy.evaluate, hence ``meshward policy explain`` and
the ext_authz service) and the compiler both take the order from here, so the rule Meshward
says decided is the rule Envoy says decided. Only the *name* depends on it: which action
(CUSTOM -> DENY -> ALLOW) wins, and so the verdict, does not.
"""

from __future__ import annotations


def rule_name(namespace: str, policy: str, index: int) -> str:
    """The RBAC policy name of rule ``index`` of policy ``namespace/policy``."""
    return f"ns[{namespace}]-policy[{policy}]-rule[{index}]"


def rule_order_key(namespace: str, policy: str, index: int) -> bytes:
    """Sort key giving Envoy's order: the name's bytes, compared as ``std::string`` does
    (unsigned bytes; UTF-8 keeps code point order, so ``str`` order agrees anyway)."""
    return rule_name(namespace, policy, index).encode()


__all__ = ["rule_name", "rule_order_key"]
