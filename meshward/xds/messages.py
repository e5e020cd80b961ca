"""What goes into and out of the sans-IO xDS protocol (:mod:`meshward.xds.protocol`): requests
reduced to what it reads, the pushes it plans and the events it reports. Kept apart so the
conversation's rules fill that module, not its vocabulary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from meshward.xds.resources import Resource
from meshward.xds.snapshot import TypeContent

# -- inputs ---------------------------------------------------------------------------------------
# Named tuples, not frozen dataclasses: the server builds one per request it reads (every ACK of
# a fan-out), and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) was a
# visible part of the loop's per-message time. Immutable and keyword-constructible all the same.
_NO_VERSIONS: Mapping[str, str] = MappingProxyType({})


class Request(NamedTuple):
    """A SotW ``DiscoveryRequest``, reduced to what the protocol reads."""

    type_url: str
    version_info: str = ""
    resource_names: tuple[str, ...] = ()
    response_nonce: str = ""
    error_detail: str | None = None  # set: NACK


class DeltaRequest(NamedTuple):
    type_url: str
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_versions: Mapping[str, str] = _NO_VERSIONS
    response_nonce: str = ""
    error_detail: str | None = None


# -- outputs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Push:
    """One response to send. ``removed`` is delta only."""

    type_url: str
    version: str
    nonce: str
    resources: tuple[Resource, ...]
    removed: tuple[str, ...] = ()
    # Set when ``resources`` are exactly this content's, in its order: the response's body is
    # then the content's encoded entries, built once for every node that gets them.
    whole: TypeContent | None = None


@dataclass(frozen=True)
class Nack:
    type_url: str
    version: str  # the version Envoy rejected
    nonce: str
    resources: tuple[str, ...]  # the names it rejected
    error: str  # redacted (see meshward.xds.redact)
    at: float
    whole_response: bool = False


@dataclass(frozen=True)
class Acked:
    type_url: str
    version: str
    nonce: str
    latency: float  # from the content change (or the request) to this ACK, seconds


@dataclass(frozen=True)
class Nacked:
    nack: Nack


@dataclass(frozen=True)
class SecretDenied:
    """The node asked for secrets that are not its own (or do not exist): it got nothing."""

    names: tuple[str, ...]


@dataclass(frozen=True)
class Ignored:
    """A request (or part of one) not acted on. ``limit``: names past the per-stream
    subscription limits, which the operator must hear about (a misbehaving node, or limits
    too tight for a real one); anything else is routine and only debug-logged."""

    type_url: str
    reason: str
    limit: bool = False


Event = Acked | Nacked | SecretDenied | Ignored
