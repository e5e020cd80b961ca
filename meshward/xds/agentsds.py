"""Point compiled resources' secrets at the node agent's SDS instead of ADS.

The compiler references the SDS names ``default`` and ``ROOTCA`` with ``sds_config: {ads: {}}``.
The control plane serves no workload SVID, so every compiled resource it serves is rewritten
here: a sidecar under `meshward agent` gets them from the agent over a Unix socket, through the
static cluster :data:`SDS_CLUSTER` that the agent's bootstrap defines. This rewrites every
``SdsSecretConfig`` in listeners' and clusters' TLS transport sockets accordingly. It runs once
per compiled workload (not per node), and is a separate pass so the compiler stays unaware of
who serves secrets. An operator-run Envoy (`meshward bootstrap`) reads them from files instead:
:mod:`meshward.xds.filesds` re-points that node's copies with the same rewrite.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

SDS_CLUSTER = "meshward-sds"  # the agent's bootstrap defines it (Unix socket)


def agent_sds_config() -> Any:
    """``ConfigSource`` for secrets from the agent: gRPC SotW SDS over cluster SDS_CLUSTER."""
    source = config_source_pb2.ConfigSource(
        resource_api_version=config_source_pb2.ApiVersion.V3,
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.ApiVersion.V3,
        ),
    )
    source.api_config_source.grpc_services.add().envoy_grpc.cluster_name = SDS_CLUSTER
    return source


#: SDS secret name -> the ConfigSource to fetch it from
SourceFor = Callable[[str], Any]


def _agent_source(_name: str) -> Any:
    return agent_sds_config()


def _rewrite_common(common: Any, source_for: SourceFor) -> None:
    for config in common.tls_certificate_sds_secret_configs:
        config.sds_config.CopyFrom(source_for(config.name))
    combined = common.combined_validation_context
    if combined.HasField("validation_context_sds_secret_config"):
        config = combined.validation_context_sds_secret_config
        config.sds_config.CopyFrom(source_for(config.name))
    if common.HasField("validation_context_sds_secret_config"):
        config = common.validation_context_sds_secret_config
        config.sds_config.CopyFrom(source_for(config.name))


def _rewrite_socket(socket: Any, kind: Any, source_for: SourceFor) -> None:
    config = socket.typed_config
    if not config.type_url.endswith(kind.DESCRIPTOR.full_name):
        return
    context = kind()
    config.Unpack(context)
    _rewrite_common(context.common_tls_context, source_for)
    config.Pack(context)


def _rewrite(message: Any, source_for: SourceFor = _agent_source) -> Any:
    """A copy of a Listener/Cluster with its TLS contexts' secrets fetched from
    ``source_for(name)`` (default: the agent); anything else (routes, endpoints) is returned as
    is. :mod:`meshward.xds.filesds` points them at files with it."""
    if isinstance(message, listener_pb2.Listener):
        message = _copy(message)
        chains = list(message.filter_chains)
        if message.HasField("default_filter_chain"):
            chains.append(message.default_filter_chain)
        for chain in chains:
            if chain.HasField("transport_socket"):
                _rewrite_socket(chain.transport_socket, tls_pb2.DownstreamTlsContext, source_for)
    elif isinstance(message, cluster_pb2.Cluster):
        message = _copy(message)
        if message.HasField("transport_socket"):
            _rewrite_socket(message.transport_socket, tls_pb2.UpstreamTlsContext, source_for)
        for match in message.transport_socket_matches:
            _rewrite_socket(match.transport_socket, tls_pb2.UpstreamTlsContext, source_for)
    return message


def secrets_from_agent(messages: Sequence[Any]) -> list[Any]:
    """Copies of ``messages`` whose TLS contexts fetch ``default``/``ROOTCA`` from the agent."""
    return [_rewrite(message) for message in messages]


class SecretsFromAgent:
    """:func:`secrets_from_agent`, memoized by object identity.

    The compiler shares proto objects between workloads and between compiles (a peer's cluster
    is built once for every caller), and the control plane packs each distinct object once. The
    same input object therefore always maps to the same rewritten object here, so that sharing
    survives the rewrite. Bounded: least recently used entries beyond ``max_entries`` go (they
    are merely rewritten again). An entry holds its input, so its ``id`` cannot be reused.
    """

    def __init__(self, max_entries: int = 100_000, max_shared: int = 64) -> None:
        self.max_entries = max_entries
        self.max_shared = max_shared
        self._cache: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        # id(shared tuple) -> (the tuple, kept alive; its rewrite): see :meth:`shared`
        self._shared: OrderedDict[int, tuple[tuple[Any, ...], tuple[Any, ...]]] = OrderedDict()

    def __call__(self, messages: Sequence[Any]) -> list[Any]:
        result: list[Any] = []
        for message in messages:
            if not isinstance(message, listener_pb2.Listener | cluster_pb2.Cluster):
                result.append(message)
                continue
            key = id(message)
            hit = self._cache.get(key)
            if hit is not None and hit[0] is message:
                self._cache.move_to_end(key)
                result.append(hit[1])
                continue
            rewritten = _rewrite(message)
            self._cache[key] = (message, rewritten)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            result.append(rewritten)
        return result

    def shared(self, messages: tuple[Any, ...]) -> tuple[Any, ...]:
        """``self(messages)`` for a tuple many workloads hold a run of (a mesh-wide list of
        peers' listeners or clusters, meshward.compile.spliced), memoized by identity: the
        tuple is rewritten once, and every holder slices the same rewritten tuple (so the
        packing of it is shared too). Bounded: the least recently used beyond
        ``max_shared`` go (they are merely rewritten again, message by message from the
        per-message cache)."""
        key = id(messages)
        hit = self._shared.get(key)
        if hit is not None and hit[0] is messages:
            self._shared.move_to_end(key)
            return hit[1]
        rewritten = tuple(self(messages))
        self._shared[key] = (messages, rewritten)
        while len(self._shared) > self.max_shared:
            self._shared.popitem(last=False)
        return rewritten

    def __len__(self) -> int:
        return len(self._cache)


def _copy(message: Any) -> Any:
    fresh = type(message)()
    fresh.CopyFrom(message)
    return fresh
