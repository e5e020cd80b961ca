"""`meshward policy validate --envoy`: Envoy's own verdict on every workload's compiled config.

:mod:`meshward.compile.envoy_limits` checks the limits we know of; this runs the real thing
(``envoy --mode validate``), which instantiates every listener, route, cluster and filter as a
sidecar would, so a CI gate catches whatever Envoy refuses, known limit or not.

Each workload is compiled in static mode (routes and endpoints inline) with its own ports, and
several workloads share one Envoy run (listeners renamed), so a policy set costs a few Envoy
starts. When a batch fails, its workloads are validated one by one to name the culprit. The
secrets come from a throwaway CA: only their shape matters to validation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from itertools import count
from typing import TYPE_CHECKING, Any

from meshward.compile.bootstrap import static_bootstrap
from meshward.compile.options import CompileOptions, Endpoint, Mode, runtime_bindings
from meshward.compile.peers import mesh_index
from meshward.compile.workload import compile_workload, to_dict
from meshward.envoy.runtime import re2_runtime

if TYPE_CHECKING:
    from meshward.policy.policyset import PolicySet

BATCH = 16  # workloads per Envoy run
FIRST_PORT = 20000
MAX_OUTPUT_CHARS = 2000
OPTIONS = CompileOptions(
    mode=Mode.STATIC,
    extauthz=Endpoint("127.0.0.1", 9191),
    otlp=Endpoint("127.0.0.1", 4317),
    access_log_path="/dev/null",
    flow_log_cluster="meshward-otlp",  # any static HTTP/2 cluster: the flow loggers get checked
)
_ERROR_LINE = re.compile(r"\[(?:critical|error)\]\[[^\]]*\]\s*(?:\[[^\]]*\]\s*)?(.*)")


@dataclass(frozen=True)
class EnvoyVerdict:
    workload: str
    ok: bool
    error: str  # Envoy's error lines ("" when ok), bounded


def _error_of(output: str) -> str:
    """Envoy's error lines (not the whole log), bounded: what a person needs to fix it."""
    lines = [m.group(1) for m in map(_ERROR_LINE.search, output.splitlines()) if m]
    text = "\n".join(lines) if lines else output[-MAX_OUTPUT_CHARS:]
    return text if len(text) <= MAX_OUTPUT_CHARS else text[:MAX_OUTPUT_CHARS] + "..."


def _bootstrap(
    policy_set: PolicySet,
    refs: Sequence[str],
    now: datetime,
    secrets: list[Any],
    base: CompileOptions,
) -> dict[str, Any]:
    options = replace(base, bindings=runtime_bindings(policy_set.workloads, count(FIRST_PORT)))
    listeners: list[dict[str, Any]] = []
    clusters: dict[str, dict[str, Any]] = {}
    index = mesh_index(policy_set, now)
    for n, ref in enumerate(refs):
        config = static_bootstrap(compile_workload(policy_set, ref, options, now=now, index=index))
        for listener in config["static_resources"]["listeners"]:
            listener["name"] += f"#{n}"
            listeners.append(listener)
        for cluster in config["static_resources"]["clusters"]:
            clusters[cluster["name"]] = cluster  # identical names carry identical content
    return {
        "node": {"id": "meshward-validate", "cluster": "meshward-validate"},
        "static_resources": {
            "listeners": listeners,
            "clusters": list(clusters.values()),
            "secrets": secrets,
        },
        "layered_runtime": re2_runtime(),
    }


def validate_with_envoy(
    policy_set: PolicySet,
    now: datetime,
    *,
    options: CompileOptions = OPTIONS,
    batch: int = BATCH,
) -> list[EnvoyVerdict]:
    """One verdict per workload (sorted by ref). Raises UserError when no Envoy is found."""
    from meshward.certs.ca import CertificateAuthority
    from meshward.certs.sds import tls_certificate_secret, validation_context_secret
    from meshward.envoy.process import validate_config

    ca = CertificateAuthority.ephemeral(policy_set.mesh.trust_domain)
    identity = f"spiffe://{policy_set.mesh.trust_domain}/ns/validate/sa/validate"
    secrets = [
        to_dict(tls_certificate_secret(ca.issue(identity))),
        to_dict(validation_context_secret(ca.trust_bundle())),
    ]
    refs = sorted(w.ref for w in policy_set.workloads)
    verdicts: list[EnvoyVerdict] = []
    for start in range(0, len(refs), max(1, batch)):
        group = refs[start : start + max(1, batch)]
        ok, output = validate_config(_bootstrap(policy_set, group, now, secrets, options))
        if ok:
            verdicts.extend(EnvoyVerdict(ref, True, "") for ref in group)
            continue
        if len(group) == 1:
            verdicts.append(EnvoyVerdict(group[0], False, _error_of(output)))
            continue
        for ref in group:
            one_ok, one = validate_config(_bootstrap(policy_set, [ref], now, secrets, options))
            verdicts.append(EnvoyVerdict(ref, one_ok, "" if one_ok else _error_of(one)))
    return verdicts
