"""The RBAC compiler covers every Source/Operation field the policy model has, through the field
pairs of meshward.policy.vocabulary: a field added to the model without a matcher would
otherwise be dropped silently (a rule that matches more than it says). Placement and the Envoy
limits check name fields by the vocabulary's YAML keys too."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from meshward.compile.authz.placement import http_only_fields
from meshward.compile.authz.rbac_policy import RuleContext, rule_policy
from meshward.compile.envoy_limits import _value_rules
from meshward.policy.model import Operation, Rule, Source
from meshward.policy.vocabulary import (
    OPERATION_FIELDS,
    OPERATION_FORMS,
    SOURCE_FIELDS,
    SOURCE_FORMS,
    FieldPair,
)

SAMPLE: dict[str, Any] = {
    "principals": "cluster.local/ns/shop/sa/frontend",
    "request_principals": "https://issuer.example/alice",
    "namespaces": "shop",
    "ip_blocks": "10.0.0.0/8",
    "remote_ip_blocks": "192.168.0.0/16",
    "hosts": "orders.example",
    "ports": 8080,
    "methods": "GET",
    "paths": "/orders",
}
HTTP = RuleContext(port_map={8080: 15001})
TCP_DENY = RuleContext(port_map={8080: 15001}, drop_http=True)


def attrs(pairs: dict[str, FieldPair] | Any) -> set[str]:
    return {name for pair in pairs.values() for name in (pair.name, pair.negated)}


@pytest.mark.parametrize(
    ("model", "pairs"), [(Source, SOURCE_FIELDS), (Operation, OPERATION_FIELDS)]
)
def test_vocabulary_names_every_field_of_the_model(model: type, pairs: Any) -> None:
    assert attrs(pairs) == {f.name for f in dataclasses.fields(model)}


def cases() -> list[tuple[str, FieldPair, str]]:
    return [
        (side, pair, attr)
        for side, pairs in (("principals", SOURCE_FIELDS), ("permissions", OPERATION_FIELDS))
        for pair in pairs.values()
        for attr in (pair.name, pair.negated)
    ]


def rule_with(side: str, pair: FieldPair, attr: str) -> Rule:
    value = (SAMPLE[pair.name],)
    if side == "principals":
        return Rule(sources=(Source(**{attr: value}),))
    return Rule(operations=(Operation(**{attr: value}),))


@pytest.mark.parametrize(("side", "pair", "attr"), cases(), ids=lambda c: getattr(c, "name", c))
def test_every_field_and_its_negation_compiles_to_a_matcher(
    side: str, pair: FieldPair, attr: str
) -> None:
    compiled = rule_policy(rule_with(side, pair, attr), HTTP)[side][0]
    assert compiled != {"any": True}
    negated = "not_id" if side == "principals" else "not_rule"
    assert (negated in compiled) == (attr == pair.negated)


@pytest.mark.parametrize(("side", "pair", "attr"), cases(), ids=lambda c: getattr(c, "name", c))
def test_tcp_deny_drops_exactly_the_http_only_fields(side: str, pair: FieldPair, attr: str) -> None:
    compiled = rule_policy(rule_with(side, pair, attr), TCP_DENY)[side][0]
    assert (compiled == {"any": True}) == pair.http_only


def test_placement_names_exactly_the_http_only_fields_by_their_yaml_key() -> None:
    forms = [
        (s, f)
        for s, fs in (("principals", SOURCE_FORMS), ("permissions", OPERATION_FORMS))
        for f in fs
    ]
    for side, form in forms:
        named = http_only_fields(rule_with(side, form.pair, form.attr))
        where = "from[0].source." if side == "principals" else "to[0].operation."
        assert named == ((where + form.key,) if form.pair.http_only else ())


def test_envoy_limits_names_every_value_by_its_yaml_key() -> None:
    """Each value is checked alone and reported under the field a policy author wrote."""
    source = Source(**{f.attr: (SAMPLE[f.pair.name],) for f in SOURCE_FORMS})
    operation = Operation(**{f.attr: (SAMPLE[f.pair.name],) for f in OPERATION_FORMS})
    found = dict(_value_rules(Rule(sources=(source,), operations=(operation,)), "r"))
    assert list(found) == [f"r.from[0].source.{f.key}[0]" for f in SOURCE_FORMS] + [
        f"r.to[0].operation.{f.key}[0]" for f in OPERATION_FORMS
    ]
    for form in SOURCE_FORMS:
        single = found[f"r.from[0].source.{form.key}[0]"]
        assert single == Rule(sources=(Source(**{form.attr: (SAMPLE[form.pair.name],)}),))
