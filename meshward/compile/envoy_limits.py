"""Limits Envoy enforces on what the compiler emits, checked before anything is served.

Applied means enforced: a policy Envoy would refuse must never be reported as in force. Envoy
refuses a whole route or listener update (a NACK) when one regex in it compiles to an RE2
program larger than the runtime limit ``re2.max_program_size.error_level``; the sidecar then
keeps its old config, so a new DENY silently does not apply. The loader cannot see this (the
regex is the compiler's), so this module compiles each policy value exactly as the compiler does
and measures every regex it produces with RE2 itself (``google-re2``). Envoy 1.40 reports the
program size of the pattern's bytes compiled as Latin-1 (``.`` and ``[^/]`` are one byte range,
not UTF-8 sequences): measured so, the sizes equal Envoy's own error messages (408 for a path
with 40 ``{*}`` segments, 85 for a 60-letter namespace prefix; tests/integration compares them
on the regexes the compiler emits).

Two entry points:

- :func:`policy_problems`: per policy value (``spec.rules[0].to[0].operation.paths[1]``), with
  file, document and field, for ``meshward policy validate`` and the control plane (which refuses
  such a policy set exactly like invalid YAML: the last good version keeps serving).
- :func:`resource_problems`: every regex in a workload's compiled resources, whatever produced
  it (a backstop for generated regexes not tied to one policy value, e.g. token parameters).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import re2  # type: ignore[import-untyped]  # google-re2 ships no stubs

from meshward.compile.authz.placement import rule_extauthz_reason
from meshward.compile.authz.principal_index import keyable_source, predicate
from meshward.compile.authz.rbac_policy import RuleContext, rule_policy
from meshward.envoy.runtime import MAX_RE2_PROGRAM_SIZE, RE2_RUNTIME_KEY
from meshward.policy.errors import PolicyError, Problem
from meshward.policy.model import AuthorizationPolicy, Condition, Operation, Rule, Source
from meshward.policy.vocabulary import OPERATION_FORMS, SOURCE_FORMS

if TYPE_CHECKING:
    from meshward.compile.workload import WorkloadResources
    from meshward.policy.policyset import PolicySet


_LATIN1 = re2.Options()
_LATIN1.encoding = re2.Options.Encoding.LATIN1


@lru_cache(maxsize=4096)
def program_size(regex: str) -> int | None:
    """RE2's program size for ``regex`` as Envoy computes it (the UTF-8 bytes, compiled as
    Latin-1); None when RE2 refuses the pattern altogether. Memoized: policy sets repeat
    their patterns."""
    try:
        return int(re2.compile(regex.encode("utf-8"), _LATIN1).programsize)
    except re2.error:
        return None


def regex_problem(regex: str, limit: int = MAX_RE2_PROGRAM_SIZE) -> str | None:
    """Why Envoy would refuse this regex, or None."""
    size = program_size(regex)
    if size is None:
        return "compiles to a regex RE2 refuses; Envoy would reject the update"
    if size > limit:
        return (
            f"compiles to a regex whose RE2 program size is {size}, over Envoy's limit of "
            f"{limit} ({RE2_RUNTIME_KEY}): every sidecar would reject the update and keep its "
            "old config"
        )
    return None


def regexes(node: Any) -> Iterator[str]:
    """Every ``safe_regex`` regex (Envoy and xds RegexMatcher) in a resource's JSON form."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "safe_regex" and isinstance(value, dict) and "regex" in value:
                yield str(value["regex"])
            else:
                yield from regexes(value)
    elif isinstance(node, list):
        for item in node:
            yield from regexes(item)


def _value_rules(rule: Rule, path: str) -> Iterator[tuple[str, Rule]]:
    """(field path, a rule holding only that one value) for every value of ``rule``."""
    for j, source in enumerate(rule.sources):
        for f in SOURCE_FORMS:
            for k, value in enumerate(getattr(source, f.attr)):
                field = f"{path}.from[{j}].source.{f.key}[{k}]"
                yield field, Rule(sources=(Source(**{f.attr: (value,)}),))
    for j, op in enumerate(rule.operations):
        for f in OPERATION_FORMS:
            for k, value in enumerate(getattr(op, f.attr)):
                field = f"{path}.to[{j}].operation.{f.key}[{k}]"
                yield field, Rule(operations=(Operation(**{f.attr: (value,)}),))
    for j, cond in enumerate(rule.conditions):
        for name, attr in (("values", "values"), ("notValues", "not_values")):
            for k, value in enumerate(getattr(cond, attr)):
                field = f"{path}.when[{j}].{name}[{k}]"
                yield field, Rule(conditions=(Condition(cond.key, **{attr: (value,)}),))


def _indexable(rule: Rule) -> bool:
    """The rule may be compiled into the principal index (every source names its callers by
    identity, prefix or namespace, as meshward.compile.authz.principal_index.rule_keys requires, and it reads no
    JWT: JWT rules are never indexed); whether it is depends on how many such rules its workload
    has, so the index form is checked for every indexable rule."""
    return (
        bool(rule.sources)
        and rule_extauthz_reason(rule) is None
        and all(keyable_source(s) for s in rule.sources)
    )


def _rule_regexes(rule: Rule, indexable: bool) -> list[str]:
    """The regexes the compiler emits for ``rule``: its RBAC policy and, when the rule may be
    indexed, the principal-index matcher form (where a path gains a query tail). Values decided
    by ext_authz emit none."""
    try:
        policy = rule_policy(rule, RuleContext(port_map={}))
    except ValueError:  # a value the loader should have refused: no regex to check
        return []
    forms: list[Any] = [policy]
    if indexable:
        for key in ("permissions", "principals"):
            forms.extend(predicate(node) for node in policy[key])
    return list(dict.fromkeys(r for form in forms for r in regexes(form)))


def _hint(field: str) -> str:
    if ".paths[" in field or ".notPaths[" in field:
        return "; use fewer {*}/{**} segments, or a shorter or prefix pattern"
    return "; use a shorter pattern (an exact value or a prefix needs no regex)"


def policy_value_problems(policy: AuthorizationPolicy) -> list[Problem]:
    """Every value of ``policy`` that compiles to something Envoy refuses."""
    origin = policy.origin
    file, index = (origin.file, origin.index) if origin else ("?", 0)
    found: list[Problem] = []
    for i, rule in enumerate(policy.rules):
        indexable = _indexable(rule)
        for field, single in _value_rules(rule, f"spec.rules[{i}]"):
            for regex in _rule_regexes(single, indexable):
                reason = regex_problem(regex)
                if reason is not None:
                    found.append(Problem(file, index, field, reason + _hint(field)))
                    break
    return found


def policy_problems(policy_set: PolicySet) -> list[Problem]:
    """Everything in the policy set Envoy would refuse once compiled, sorted."""
    found: list[Problem] = []
    for policy in policy_set.authorization_policies:
        found.extend(policy_value_problems(policy))
    return sorted(set(found))


def check_policy_set(policy_set: PolicySet) -> None:
    """Raise PolicyError (as the loader does for invalid YAML) when Envoy would refuse what the
    policy set compiles to. The control plane and ext_authz run this on every change."""
    problems = policy_problems(policy_set)
    if problems:
        raise PolicyError(problems)


def resource_problems(resources: WorkloadResources) -> list[str]:
    """Every regex in a workload's compiled resources that Envoy would refuse, as
    ``resource name: reason`` lines (empty when all pass)."""
    out: list[str] = []
    for messages in resources.by_type().values():
        out.extend(_message_problems(messages))
    return out


def _message_problems(messages: Sequence[Any]) -> Iterator[str]:
    from meshward.compile.message_regexes import message_regexes

    for message in messages:
        name = getattr(message, "name", "") or getattr(message, "cluster_name", "")
        for regex in dict.fromkeys(message_regexes(message)):
            reason = regex_problem(regex)
            if reason is not None:
                head = regex if len(regex) <= 80 else regex[:80] + "..."
                yield f"{name}: regex {head!r} {reason}"


def message_problems(message: Any) -> list[str]:
    """:func:`resource_problems` of one compiled message (the control plane checks a message
    shared by many workloads, such as a peer's outbound cluster, once)."""
    return list(_message_problems([message]))


def check_resources(resources: WorkloadResources) -> None:
    """Raise ValueError when a compiled resource would be refused by Envoy (the control plane's
    compiler calls this: the workload keeps its last good config and status shows why)."""
    problems = resource_problems(resources)
    if problems:
        raise ValueError(f"{resources.workload}: " + "; ".join(problems[:3]))


__all__ = [
    "MAX_RE2_PROGRAM_SIZE",
    "RE2_RUNTIME_KEY",
    "check_policy_set",
    "check_resources",
    "message_problems",
    "policy_problems",
    "program_size",
    "regex_problem",
    "resource_problems",
]
