"""The node id format, and the rule tying a node id to the identity in its client certificate.

Format: ``<namespace>/<workload>`` for a single sidecar, ``<namespace>/<workload>/<instance>``
when a workload runs several (replicas). The first two parts are the workload reference used
everywhere else (``meshward bootstrap --workload NS/NAME``, ``PolicySet.workload("ns/name")``), so
a node id reads the same in Envoy's admin page, in ``meshward status`` and in policy files.
Every replica of a workload gets the same listeners and clusters, and its own SVID.

Authentication: the ADS connection is mTLS and the client certificate carries a SPIFFE ID. A node
is accepted only if that ID equals the identity of the workload its id names
(``spiffe://<td>/ns/<namespace>/sa/<service account>``), so a certificate for workload A can never
open a stream as workload B (and so can never be sent B's key).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from meshward.certs.spiffe import SpiffeId

_PART = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


class InvalidNodeId(ValueError):
    """The node id does not follow ``<namespace>/<workload>[/<instance>]``."""


@dataclass(frozen=True, order=True)
class NodeId:
    namespace: str
    workload: str
    instance: str = ""

    @property
    def workload_ref(self) -> str:
        return f"{self.namespace}/{self.workload}"

    def __str__(self) -> str:
        base = self.workload_ref
        return f"{base}/{self.instance}" if self.instance else base

    def envoy_cluster(self) -> str:
        """Envoy's ``node.cluster`` (its service cluster in stats and traces): ``name.ns``."""
        return f"{self.workload}.{self.namespace}"

    @classmethod
    def parse(cls, value: str) -> NodeId:
        parts = value.split("/")
        if len(parts) not in (2, 3) or not all(_PART.match(part) for part in parts):
            raise InvalidNodeId(
                f"node id {value[:100]!r} is not <namespace>/<workload>[/<instance>] "
                "(letters, digits, '.', '_', '-')"
            )
        return cls(*parts)


#: The ADS server's service account (in the root namespace): sidecars pin its SPIFFE ID.
SERVER_SERVICE_ACCOUNT = "meshward-xds"


def expected_spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return str(SpiffeId(trust_domain, namespace, service_account))
