"""Every Source/Operation field is spelled once, in meshward.policy.vocabulary: the loader's YAML
key, the canonical form's key and the evaluator's explanation path all agree for each field and
its negation, so a renamed or added field cannot leave one consumer behind."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml

from meshward.policy import Operation, Rule, Source, parse
from meshward.policy.canonical import rule_document
from meshward.policy.evaluator import compile_operation, compile_source
from meshward.policy.vocabulary import OPERATION_FORMS, SOURCE_FORMS, FieldForm
from tests.unit.compile.test_rbac_fields import SAMPLE  # one value per field, shared

FORMS = [("source", f) for f in SOURCE_FORMS] + [("operation", f) for f in OPERATION_FORMS]


def policy_yaml(side: str, form: FieldForm) -> str:
    item = {form.key: [SAMPLE[form.pair.name]]}
    rule = {"from": [{"source": item}]} if side == "source" else {"to": [{"operation": item}]}
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [rule]},
    }
    return yaml.safe_dump(doc)


@pytest.mark.parametrize(("model", "forms"), [(Source, SOURCE_FORMS), (Operation, OPERATION_FORMS)])
def test_forms_walk_the_model_fields_in_model_order(model: type, forms: Any) -> None:
    """The canonical YAML lists fields in this order, so it must not drift from the model's."""
    assert [f.attr for f in forms] == [f.name for f in dataclasses.fields(model)]
    assert [f.negate for f in forms] == [a.startswith("not_") for a in (f.attr for f in forms)]


@pytest.mark.parametrize(("side", "form"), FORMS, ids=lambda c: getattr(c, "key", c))
def test_loader_canonical_form_and_evaluator_agree_on_each_key(side: str, form: FieldForm) -> None:
    policy = parse({"p.yaml": policy_yaml(side, form)}).authorization_policies[0]
    rule = policy.rules[0]
    item = rule.sources[0] if side == "source" else rule.operations[0]
    assert getattr(item, form.attr)  # the loader read the YAML key into this attribute
    document = rule_document(rule)
    written = document["from"][0]["source"] if side == "source" else document["to"][0]["operation"]
    assert list(written) == [form.key]
    checks = compile_source(item, "s.") if side == "source" else compile_operation(item, "o.")
    assert [(c.path.split(".", 1)[1], c.negate, c.http_only) for c in checks] == [
        (form.key, form.negate, form.pair.http_only)
    ]


def test_canonical_form_lists_a_full_source_in_vocabulary_order() -> None:
    source = Source(**{f.attr: (str(SAMPLE[f.pair.name]),) for f in SOURCE_FORMS})
    operation = Operation(**{f.attr: (SAMPLE[f.pair.name],) for f in OPERATION_FORMS})
    document = rule_document(Rule(sources=(source,), operations=(operation,)))
    assert list(document["from"][0]["source"]) == [
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
    ]
    assert list(document["to"][0]["operation"]) == [
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ]
