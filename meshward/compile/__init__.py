"""Policy model -> Envoy config per workload (see DESIGN.md "What runs where").

Pure functions: the same policy set, workload and options give byte-identical resources.
The control plane calls :func:`compile_workload` (or :func:`compile_mesh`) with
``CompileOptions(mode=Mode.XDS, ...)`` and serves the resulting listeners, routes, clusters and
endpoints; secrets are referenced by the SDS names ``default`` and ``ROOTCA``.
"""

from meshward.compile.authz import (
    AuthzPlacement,
    PlacedRule,
    Placement,
    needs_extauthz,
    place_rules,
)
from meshward.compile.bootstrap import static_bootstrap
from meshward.compile.names import (
    CLUSTER_EXTAUTHZ,
    CLUSTER_OTLP,
    CLUSTER_XDS,
    CONTEXT_PORT,
    CONTEXT_WORKLOAD,
    SECRET_DEFAULT,
    SECRET_ROOTCA,
    rbac_policy_name,
)
from meshward.compile.options import (
    AccessLogFormat,
    CompileOptions,
    Endpoint,
    Mode,
    PortBinding,
    WorkloadBinding,
    runtime_bindings,
)
from meshward.compile.peers import peers_of
from meshward.compile.workload import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    SECRET,
    WorkloadResources,
    authz_placement,
    compile_mesh,
    compile_workload,
)

__all__ = [
    "CLUSTER",
    "CLUSTER_EXTAUTHZ",
    "CLUSTER_OTLP",
    "CLUSTER_XDS",
    "CONTEXT_PORT",
    "CONTEXT_WORKLOAD",
    "ENDPOINT",
    "LISTENER",
    "ROUTE",
    "SECRET",
    "SECRET_DEFAULT",
    "SECRET_ROOTCA",
    "AccessLogFormat",
    "AuthzPlacement",
    "CompileOptions",
    "Endpoint",
    "Mode",
    "PlacedRule",
    "Placement",
    "PortBinding",
    "WorkloadBinding",
    "WorkloadResources",
    "authz_placement",
    "compile_mesh",
    "compile_workload",
    "needs_extauthz",
    "peers_of",
    "place_rules",
    "rbac_policy_name",
    "runtime_bindings",
    "static_bootstrap",
]
