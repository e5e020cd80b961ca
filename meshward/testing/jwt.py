"""Test support for end-user JWTs: a policy set under either jwtEnforcement setting."""

from __future__ import annotations

from dataclasses import replace

from meshward.policy.model import JwtEnforcement, RequestAuthentication
from meshward.policy.policyset import PolicySet


def with_jwt_enforcement(
    policy_set: PolicySet,
    enforcement: JwtEnforcement,
    *,
    request_authentications: tuple[RequestAuthentication, ...] | None = None,
) -> PolicySet:
    """``policy_set`` with the mesh's ``jwtEnforcement`` set (and optionally other
    RequestAuthentications), version recomputed."""
    return PolicySet.create(
        mesh=replace(policy_set.mesh, jwt_enforcement=enforcement),
        workloads=policy_set.workloads,
        authorization_policies=policy_set.authorization_policies,
        peer_authentications=policy_set.peer_authentications,
        request_authentications=(
            policy_set.request_authentications
            if request_authentications is None
            else request_authentications
        ),
    )
