"""The ADS gRPC method handlers: both stream kinds handed to the server's ``serve``, responses
written as the bytes :class:`meshward.xds.server.AdsServer` already encoded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2


class StreamServer(Protocol):
    async def serve(
        self, mode: str, request_iterator: AsyncIterator[Any], context: Any
    ) -> None: ...


def _serialize(response: Any) -> bytes:
    """Responses are written already encoded (``_encode``); anything else is a message."""
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


def ads_handler(server: StreamServer) -> Any:
    """The ADS service as ads_pb2_grpc registers it, but with a response serializer that
    passes pre-encoded bytes through."""
    servicer = _Servicer(server)
    return grpc.method_handlers_generic_handler(
        "envoy.service.discovery.v3.AggregatedDiscoveryService",
        {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                servicer.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                servicer.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize,
            ),
        },
    )


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, server: StreamServer) -> None:
        self._server = server

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> None:
        await self._server.serve("sotw", request_iterator, context)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> None:
        await self._server.serve("delta", request_iterator, context)
