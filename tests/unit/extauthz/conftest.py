"""Shared material for the ext_authz unit tests: a real RSA issuer and a policy set using it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshward.policy import PolicySet, parse
from meshward.testing.extauthz import HTTPBIN_YAML, mesh_yaml
from meshward.testing.jwt_issuer import LocalIssuer


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
    """``policy_set_for(*docs, ra_extra="", verbose=False, jwt="extauthz")``: the workload, a
    RequestAuthentication trusting ``issuer`` and the given documents. ``jwt``: the mesh's
    jwtEnforcement; these tests default to the service verifying tokens itself."""

    def build(
        *docs: str,
        ra_extra: str = "",
        with_ra: bool = True,
        verbose: bool = False,
        jwt: str = "extauthz",
    ) -> PolicySet:
        # verbose: denial bodies name policy, rule and reason (default: quiet)
        parts = [HTTPBIN_YAML, mesh_yaml(verbose=verbose, jwt=jwt)]
        if with_ra:
            parts.append(
                issuer.request_authentication_yaml("foo", "jwt", {"app": "httpbin"}, extra=ra_extra)
            )
        parts.extend(docs)
        return parse({"policy.yaml": "---\n".join(parts)})

    return build
