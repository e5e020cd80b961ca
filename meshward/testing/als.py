"""A flow-log (gRPC ALS) client that can misbehave: report for another workload, send garbage,
flood. grpclib + the standard library's TLS, like :mod:`meshward.testing.ads_client` (grpcio's client
wants a DNS name in the server certificate; SVIDs carry only a SPIFFE URI)."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from meshward.compile.observe import FLOW_LOG_NAME

METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class Garbage:
    """A 'message' whose bytes are not a StreamAccessLogsMessage."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


def http_entry(
    workload: str,
    *,
    path: str = "/orders/1",
    method: int = 1,  # GET
    status: int = 200,
    details: str = "via_upstream",
    principal: str = "",
    port: int = 8080,
) -> Any:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.custom_tags.update(
        {"workload": workload, "direction": "inbound", "port": str(port), "kind": "http"}
    )
    common.start_time.GetCurrentTime()
    if principal:
        common.tls_properties.peer_certificate_properties.subject_alt_name.add(uri=principal)
    entry.request.path = path
    entry.request.request_method = method
    entry.response.response_code.value = status
    entry.response.response_code_details = details
    return entry


def message(node_id: str | None, entries: Sequence[Any]) -> Any:
    msg = als_pb2.StreamAccessLogsMessage()
    if node_id is not None:
        msg.identifier.node.id = node_id
        msg.identifier.log_name = FLOW_LOG_NAME
    msg.http_logs.log_entry.extend(entries)
    return msg


async def send(
    host: str, port: int, context: ssl.SSLContext, messages: Sequence[Any], *, raw: bool = False
) -> tuple[str, str]:
    """Send ``messages`` on one stream: (grpc status name, message); ``raw``: Garbage items."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    channel = Channel(host, port, ssl=context)
    request_type: Any = Garbage if raw else als_pb2.StreamAccessLogsMessage
    try:
        async with channel.request(
            METHOD, Cardinality.STREAM_UNARY, request_type, als_pb2.StreamAccessLogsResponse
        ) as stream:
            for item in messages:
                await stream.send_message(item)
            await stream.end()
            await stream.recv_message()
        return "OK", ""
    except GRPCError as exc:
        return exc.status.name, str(exc.message or "")
    except (StreamTerminatedError, ConnectionError) as exc:
        return "TERMINATED", str(exc)
    finally:
        channel.close()
