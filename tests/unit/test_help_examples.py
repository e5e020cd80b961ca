"""Every example in every `--help` names workloads, identities and policies the shipped
examples/ declare, so each one can be pasted and run (`policy compile --help` once showed
`shop/checkout`, which no example declares)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshward.cli import build_parser
from meshward.compile.names import EXTAUTHZ_SERVICE_ACCOUNT
from meshward.policy import load
from meshward.xds.nodeid import SERVER_SERVICE_ACCOUNT

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REF = r"([a-z0-9][a-z0-9-]*/[a-z0-9][a-z0-9-]*)"
# a flag or cases-file field that takes a workload NS/NAME; "\" + newline continues a line
WORKLOAD_REF = re.compile(
    r"(?:--workload|--source-workload|--from|--node|\bfrom:|\bto:)\s+(?:\\\s+)?" + REF
)
POLICY_REF = re.compile(r"\bpolicy:\s+" + REF)
IDENTITY = re.compile(r"ns/([a-z0-9][a-z0-9-]*)/sa/([a-z0-9][a-z0-9-]*)")


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, str]]:
    text = "\n".join([parser.description or "", parser.epilog or ""])
    text += "\n".join(action.help or "" for action in parser._actions)
    yield name, text
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


HELP = dict(_parsers(build_parser(), "meshward"))


def test_the_walk_sees_the_commands_whose_examples_name_workloads() -> None:
    for command in ("meshward policy compile", "meshward policy explain", "meshward status"):
        assert WORKLOAD_REF.search(HELP[command]), command


@pytest.mark.parametrize("command", sorted(HELP))
def test_help_examples_name_what_examples_declare(command: str) -> None:
    policy = load([EXAMPLES])
    workloads = {w.ref for w in policy.workloads}
    identities = {
        (w.namespace, w.principal(policy.mesh.trust_domain).rsplit("/", 1)[1])
        for w in policy.workloads
    } | {  # Meshward's own services run as these, in the root namespace
        (policy.mesh.root_namespace, account)
        for account in (SERVER_SERVICE_ACCOUNT, EXTAUTHZ_SERVICE_ACCOUNT)
    }
    policies = {f"{p.namespace}/{p.name}" for p in policy.authorization_policies}
    text = HELP[command]
    for ref in WORKLOAD_REF.findall(text):
        assert ref in workloads, f"`{command} --help` names workload {ref}, not in examples/"
    for ref in POLICY_REF.findall(text):
        assert ref in policies, f"`{command} --help` names policy {ref}, not in examples/"
    for namespace, account in IDENTITY.findall(text):
        assert (namespace, account) in identities, (
            f"`{command} --help` names identity ns/{namespace}/sa/{account}, which no workload "
            "in examples/ runs as"
        )
