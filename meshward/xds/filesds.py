"""Secrets from files for an operator-run Envoy (`meshward bootstrap`): file-based SDS.

Without an agent there is no SDS server on the node, and the control plane serves no workload
SVID. So `meshward bootstrap` keeps the key and SVID in files in the sidecar's directory and
points Envoy at them through *file-based SDS*: each secret's ``sds_config`` is a
``path_config_source`` naming a small JSON file (one ``Secret``, here :data:`SDS_FILES`) whose
``TlsCertificate`` / ``CertificateValidationContext`` reference the PEM files by name, with the
directory as ``watched_directory``. Envoy reloads them when a file is moved into the directory,
so `meshward bootstrap --renew`, which replaces them atomically, reaches a running Envoy.

Compiled resources are shared by every node of a workload and point at the agent's SDS
(:mod:`meshward.xds.agentsds`). A node whose Envoy reads files says where in its node metadata
(:data:`METADATA_SECRETS_DIR`, the directory as Envoy sees it); the control plane serves that
node copies of its listeners and clusters re-pointed there (:class:`FilesSdsRewriter`). The same
``ConfigSource`` is used by the bootstrap's ADS cluster, so the ADS connection and the data
plane present the same SVID.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf import json_format

from meshward.xds import typeurls
from meshward.xds.agentsds import _rewrite
from meshward.xds.resources import Resource, make_resource

METADATA_SECRETS_DIR = "meshward.dev/secrets-dir"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: SDS secret name -> the file (in the secrets directory) that defines it
SDS_FILES = {"default": "sds-default.json", "ROOTCA": "sds-rootca.json"}
MAX_DIR_LENGTH = 512
_SAFE_DIR = re.compile(r"^/[A-Za-z0-9._/+@=,:~-]*$")


def check_secrets_dir(directory: str) -> str:
    """``directory`` without a trailing slash, or ValueError saying what is wrong with it."""
    if not isinstance(directory, str) or not directory:
        raise ValueError(f"{METADATA_SECRETS_DIR} must be a non-empty string")
    if len(directory) > MAX_DIR_LENGTH:
        raise ValueError(f"{METADATA_SECRETS_DIR} is longer than {MAX_DIR_LENGTH} characters")
    if not _SAFE_DIR.fullmatch(directory) or "/../" in f"{directory}/" or "//" in directory:
        raise ValueError(
            f"{METADATA_SECRETS_DIR} {directory[:80]!r} must be an absolute, normalized path of "
            "letters, digits and ._/+@=,:~- (where this Envoy finds the files of `meshward "
            "bootstrap`)"
        )
    return directory.rstrip("/") or "/"


def secrets_dir_of(envoy_node: Any) -> str | None:
    """The secrets directory an Envoy ``Node`` announces (None: its secrets come from an agent).
    ValueError for an unusable one."""
    if envoy_node is None or not envoy_node.HasField("metadata"):
        return None
    fields = envoy_node.metadata.fields
    if METADATA_SECRETS_DIR not in fields:
        return None
    value = fields[METADATA_SECRETS_DIR]
    if value.WhichOneof("kind") != "string_value":
        raise ValueError(f"{METADATA_SECRETS_DIR} must be a string")
    return check_secrets_dir(value.string_value)


def sds_config(directory: str, name: str) -> dict[str, Any]:
    """The ``ConfigSource`` (JSON form) of secret ``name`` read from files in ``directory``."""
    return {
        "resource_api_version": "V3",
        "path_config_source": {
            "path": f"{directory}/{SDS_FILES[name]}",
            "watched_directory": {"path": directory},
        },
    }


def sds_secret_config(directory: str, name: str) -> dict[str, Any]:
    """An ``SdsSecretConfig`` (JSON form) for the bootstrap's own clusters."""
    return {"name": name, "sds_config": sds_config(directory, name)}


def secret_documents(directory: str, svid_file: str, bundle_file: str) -> dict[str, str]:
    """File name -> content of the SDS files: ``default`` from ``svid_file`` (the key, then the
    chain, in one file replaced atomically, so Envoy never reads a key beside another key's
    certificate) and ``ROOTCA`` from ``bundle_file``. They reference the PEM files by path and
    never change; the PEM files do."""
    watched = {"path": directory}
    svid = f"{directory}/{svid_file}"
    secrets = {
        "default": {
            "name": "default",
            "tls_certificate": {
                "certificate_chain": {"filename": svid},
                "private_key": {"filename": svid},
                "watched_directory": watched,
            },
        },
        "ROOTCA": {
            "name": "ROOTCA",
            "validation_context": {
                "trusted_ca": {"filename": f"{directory}/{bundle_file}"},
                "watched_directory": watched,
            },
        },
    }
    return {
        SDS_FILES[name]: json.dumps({"resources": [{"@type": SECRET_TYPE, **secret}]}, indent=2)
        + "\n"
        for name, secret in secrets.items()
    }


def _source_for(directory: str) -> Any:
    sources = {
        name: json_format.ParseDict(sds_config(directory, name), config_source_pb2.ConfigSource())
        for name in SDS_FILES
    }

    def source_for(name: str) -> Any:
        if name not in sources:  # the compiler names only these two
            raise ValueError(f"no file-based SDS for secret {name!r}")
        return sources[name]

    return source_for


_KINDS = {typeurls.LISTENER: listener_pb2.Listener, typeurls.CLUSTER: cluster_pb2.Cluster}


class FilesSdsRewriter:
    """A node's listeners and clusters with their secrets read from files in its directory.

    Memoized by (resource content hash, directory), least recently used beyond ``max_entries``
    dropped (they are merely rewritten again): an unchanged resource is rewritten once per
    directory, and a node's snapshot keeps the same rewritten objects (same versions)."""

    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, str, str], Resource] = OrderedDict()
        self._sources: OrderedDict[str, Any] = OrderedDict()

    def rewrite(
        self, resources: Mapping[str, list[Resource]], directory: str
    ) -> dict[str, list[Resource]]:
        out = dict(resources)
        for type_url in _KINDS:
            if type_url in out:
                out[type_url] = [self._one(r, directory) for r in out[type_url]]
        return out

    def _one(self, resource: Resource, directory: str) -> Resource:
        key = (resource.type_url, resource.hash, directory)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        message = _KINDS[resource.type_url]()
        resource.body.Unpack(message)
        rewritten = make_resource(_rewrite(message, self._source(directory)))
        self._cache[key] = rewritten
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return rewritten

    def _source(self, directory: str) -> Any:
        source = self._sources.get(directory)
        if source is None:
            source = self._sources[directory] = _source_for(directory)
            while len(self._sources) > 1_000:
                self._sources.popitem(last=False)
        self._sources.move_to_end(directory)
        return source

    def __len__(self) -> int:
        return len(self._cache)
