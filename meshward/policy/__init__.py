"""Policy as code: the Istio-compatible model, loader, validation, evaluator and explain.

Pure: nothing here opens sockets or starts threads; only `load` reads files.
"""

from meshward.policy.errors import PolicyError, Problem
from meshward.policy.evaluator import evaluate
from meshward.policy.loader import load, parse
from meshward.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    DRY_RUN_ANNOTATION,
    EXPIRES_AT_ANNOTATION,
    Action,
    AuthorizationPolicy,
    Condition,
    Decision,
    DryRunResult,
    JwtHeader,
    JwtRule,
    MeshConfig,
    MtlsMode,
    Operation,
    Origin,
    PeerAuthentication,
    Protocol,
    Request,
    RequestAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.policy.paths import PathRejected, normalize_path, path_template_regex
from meshward.policy.policyset import PolicySet

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "DEFAULT_TRUST_DOMAIN",
    "DRY_RUN_ANNOTATION",
    "EXPIRES_AT_ANNOTATION",
    "Action",
    "AuthorizationPolicy",
    "Condition",
    "Decision",
    "DryRunResult",
    "JwtHeader",
    "JwtRule",
    "MeshConfig",
    "MtlsMode",
    "Operation",
    "Origin",
    "PathRejected",
    "PeerAuthentication",
    "PolicyError",
    "PolicySet",
    "Problem",
    "Protocol",
    "Request",
    "RequestAuthentication",
    "Rule",
    "Source",
    "Workload",
    "WorkloadPort",
    "evaluate",
    "load",
    "normalize_path",
    "parse",
    "path_template_regex",
]
