"""The generic shapes every document kind is read with (mappings, strings, lists, labels,
selectors, names, metadata): each check appends to the shared problem list and carries on, so
one run reports every problem."""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from meshward.policy.errors import Problem
from meshward.policy.matching import parse_network, wildcard_problem
from meshward.policy.model import (
    MeshConfig,
    Origin,
)

DEFAULT_NAMESPACE = "default"  # where Kubernetes puts a namespaced object that names none
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
METADATA_FIELDS = frozenset({"name", "namespace", "labels", "annotations"})
# Fields `kubectl get -o yaml` adds; accepted and ignored so exported objects load unchanged.
KUBERNETES_METADATA = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "ownerReferences",
        "finalizers",
        "selfLink",
        "generateName",
    }
)


@dataclass
class Doc:
    file: str
    index: int
    data: dict[str, Any]
    kind: str

    @property
    def origin(self) -> Origin:
        return Origin(self.file, self.index)


def type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def did_you_mean(word: str, options: Collection[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


class DocumentReader:
    """Reads one document; every check appends to the shared problem list and carries on."""

    def __init__(self, doc: Doc, problems: list[Problem], mesh: MeshConfig | None = None) -> None:
        self.doc = doc
        self.problems = problems
        self.mesh = mesh or MeshConfig()

    def error(self, field: str, reason: str) -> None:
        self.problems.append(Problem(self.doc.file, self.doc.index, field, reason))

    # ---- generic shapes

    def mapping(
        self, value: Any, path: str, allowed: Collection[str], *, ignored: Collection[str] = ()
    ) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping, got {type_name(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            field = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.error(field, "field names must be strings")
            elif key in allowed:
                out[key] = item
            elif key not in ignored:
                self.error(field, f"unknown field{did_you_mean(key, allowed)}")
        return out

    def string(self, value: Any, path: str, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.error(path, "required")
            return None
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {type_name(value)}")
            return None
        if required and not value:
            self.error(path, "must not be empty")
            return None
        return value

    def str_list(self, value: Any, path: str, *, numbers: bool = False) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(
            isinstance(v, str) or (numbers and isinstance(v, int) and not isinstance(v, bool))
            for v in value
        ):
            self.error(path, "expected a list of strings")
            return ()
        items = tuple(str(v) for v in value)
        for i, item in enumerate(items):
            if not item:
                self.error(f"{path}[{i}]", "must not be empty")
        return items

    def patterns(self, value: Any, path: str) -> tuple[str, ...]:
        items = self.str_list(value, path)
        for i, item in enumerate(items):
            problem = wildcard_problem(item)
            if problem:
                self.error(f"{path}[{i}]", problem)
        return items

    def networks(self, value: Any, path: str) -> tuple[str, ...]:
        items = self.str_list(value, path)
        for i, item in enumerate(items):
            try:
                parse_network(item)
            except ValueError:
                self.error(f"{path}[{i}]", f"{item!r} is not an IP address or CIDR block")
        return items

    def ports(self, value: Any, path: str) -> tuple[int, ...]:
        items = self.str_list(value, path, numbers=True)
        out: list[int] = []
        for i, item in enumerate(items):
            port = port_value(item)
            if port is None:
                self.error(f"{path}[{i}]", f"{item!r} is not a port number (1-65535)")
            else:
                out.append(port)
        return tuple(out)

    def labels(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping of label names to values, got {type_name(value)}")
            return {}
        out: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                self.error(path, f"label name {key!r} must be a non-empty string")
            elif not isinstance(item, str):
                self.error(
                    f"{path}.{key}", f"label values are strings, got {type_name(item)} (quote it)"
                )
            else:
                out[key] = item
        return out

    def entries(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {type_name(value)}")
            return []
        return value

    def selector(self, value: Any, path: str) -> Mapping[str, str] | None:
        if value is None:
            return None
        sel = self.mapping(value, path, ("matchLabels",))
        labels = self.labels(sel.get("matchLabels"), f"{path}.matchLabels")
        return labels or None

    def name(self, value: Any, path: str, pattern: re.Pattern[str], what: str) -> str | None:
        text = self.string(value, path, required=True)
        if text is not None and not pattern.match(text):
            self.error(path, f"{text!r} is not a valid {what}")
            return None
        return text

    # ---- metadata

    def metadata(
        self, *, namespaced: bool = True
    ) -> tuple[str, str, dict[str, str], dict[str, str]]:
        data = self.doc.data
        top_allowed = ("apiVersion", "kind", "metadata", "spec")
        self.mapping(data, "", top_allowed, ignored=("status",))
        meta = self.mapping(
            data.get("metadata"), "metadata", METADATA_FIELDS, ignored=KUBERNETES_METADATA
        )
        name = self.name(meta.get("name"), "metadata.name", DNS_SUBDOMAIN, "name") or ""
        namespace = DEFAULT_NAMESPACE
        if namespaced and meta.get("namespace") is not None:
            namespace = (
                self.name(meta.get("namespace"), "metadata.namespace", DNS_LABEL, "namespace")
                or DEFAULT_NAMESPACE
            )
        labels = self.labels(meta.get("labels"), "metadata.labels")
        annotations: dict[str, str] = {}
        raw = meta.get("annotations")
        if raw is not None:
            if not isinstance(raw, dict):
                self.error("metadata.annotations", f"expected a mapping, got {type_name(raw)}")
            else:
                annotations = {str(k): v for k, v in raw.items()}
        return name, namespace, labels, annotations

    # ---- meshward.dev/v1


def port_value(value: int | str) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        # ASCII digits only: str.isdigit() also accepts "²" (int() refuses it) and "٣" (3).
        if not (value.isascii() and value.isdigit()) or len(value) > 5:
            return None
        value = int(value)
    return value if 1 <= value <= 65535 else None


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
