"""Shared material for the ext_authz unit tests: a real RSA issuer and a policy set using it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshward.extauthz.issuer import LocalIssuer
from meshward.policy import PolicySet, parse

WORKLOAD_YAML = """\
apiVersion: meshward.dev/v1
kind: Workload
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin}}
spec: {ports: [{name: http, port: 8000}]}
"""


VERBOSE_MESH_YAML = """\
apiVersion: meshward.dev/v1
kind: MeshConfig
metadata: {name: mesh}
spec: {denialDetails: verbose}
"""


@pytest.fixture(scope="session")
def issuer() -> LocalIssuer:
    return LocalIssuer()


@pytest.fixture(scope="session")
def other_issuer() -> LocalIssuer:
    """Same issuer name and kid, different key: what a forger has."""
    return LocalIssuer(kid="meshward-demo-1")


PolicyFactory = Callable[..., PolicySet]


@pytest.fixture(scope="session")
def policy_set_for(issuer: LocalIssuer) -> PolicyFactory:
    """``policy_set_for(*docs, ra_extra="", verbose=False)``: the workload, a RequestAuthentication trusting
    ``issuer`` and the given documents."""

    def build(
        *docs: str, ra_extra: str = "", with_ra: bool = True, verbose: bool = False
    ) -> PolicySet:
        parts = [WORKLOAD_YAML]
        if verbose:  # denial bodies name policy, rule and reason (default: quiet)
            parts.append(VERBOSE_MESH_YAML)
        if with_ra:
            parts.append(
                issuer.request_authentication_yaml("foo", "jwt", {"app": "httpbin"}, extra=ra_extra)
            )
        parts.extend(docs)
        return parse({"policy.yaml": "---\n".join(parts)})

    return build
