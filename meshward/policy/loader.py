"""YAML in, validated model out. Every problem in every document is collected before failing,
each named by file, document index and field path, so one run of `meshward policy validate`
shows the whole repair list."""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from meshward.policy.errors import PolicyError, Problem
from meshward.policy.matching import parse_network, strip_spiffe, wildcard_problem
from meshward.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN,
    DRY_RUN_ANNOTATION,
    EXPIRES_AT_ANNOTATION,
    Action,
    AuthorizationPolicy,
    Condition,
    DenialDetails,
    JwtEnforcement,
    JwtHeader,
    JwtRule,
    MeshConfig,
    MtlsMode,
    Operation,
    Origin,
    PeerAuthentication,
    Protocol,
    RequestAuthentication,
    Rule,
    Source,
    Workload,
    WorkloadPort,
)
from meshward.policy.paths import (
    check_path_template,
    is_path_template,
    unanchored_path_problem,
)
from meshward.policy.policyset import PolicySet

ISTIO_API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
MESHWARD_API_VERSION = "meshward.dev/v1"
ISTIO_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")
MESHWARD_KINDS = ("Workload", "MeshConfig")
# Documents that live beside policies but are not policy: `meshward policy test` case tables.
SKIPPED_KINDS = frozenset({"PolicyTests"})
DEFAULT_NAMESPACE = "default"  # where Kubernetes puts a namespaced object that names none
POLICY_SUFFIXES = (".yaml", ".yml")
# Limits on hostile or broken input: a policy file is small, shallow and (nearly) alias-free.
# Without them a 10 MB file takes minutes in PyYAML, a deeply nested document overflows
# Python's stack, and a YAML bomb (anchors and aliases) stands for billions of nodes that
# validation, hashing and compilation would each walk.
MAX_FILE_BYTES = 2 * 1024 * 1024  # per file: ~8,000 policies; PyYAML reads ~0.5 MB/s here
MAX_DEPTH = 64  # nested collections; real policies use about 10
# YAML nodes per file, an alias counting as every node it stands for: 3x what a file of
# MAX_FILE_BYTES written out holds, so only aliasing (a YAML bomb) reaches it.
MAX_NODES = 1_000_000
MAX_INT_DIGITS = 20  # longer integers are no port, count or timestamp anyone writes

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z:]+$")
_CLAIM_KEY = re.compile(r"^request\.auth\.claims((?:\[[^\[\]]+\])+)$")
_HEADER_KEY = re.compile(r"^request\.headers\[([^\[\]]*)\]$")
IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
PORT_KEYS = frozenset({"destination.port"})
PLAIN_KEYS = frozenset(
    {
        "source.namespace",
        "source.principal",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "connection.sni",
    }
)
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


def claim_path(key: str) -> tuple[str, ...] | None:
    """``request.auth.claims[a][b]`` -> ("a", "b")."""
    match = _CLAIM_KEY.match(key)
    if not match:
        return None
    return tuple(re.findall(r"\[([^\[\]]+)\]", match.group(1)))


def header_name(key: str) -> str | None:
    match = _HEADER_KEY.match(key)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- reading files


def is_policy_file(path: Path) -> bool:
    """YAML files that are not hidden, editor backups (``x.yaml~``) or swap/lock files."""
    return path.suffix in POLICY_SUFFIXES and not path.name.startswith((".", "#", "~"))


def policy_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files a set of paths stands for: directories recursively and sorted (hidden entries
    and editor temp files skipped), files named explicitly as given whatever their suffix.
    The loader and the policy watcher share it, so both always agree on what is read."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and is_policy_file(p)
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
            )
        else:
            found.append(path)
    return found


def load(paths: Sequence[str | Path]) -> PolicySet:
    """Read policy files and directories (see :func:`policy_files`) and parse them as one set."""
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = policy_files([path])
            if not found:
                problems.append(Problem(str(path), 0, "", "directory holds no *.yaml or *.yml"))
            for file in found:
                _read(file, texts, problems)
        elif path.exists():
            _read(path, texts, problems)
        else:
            problems.append(Problem(str(path), 0, "", "no such file or directory"))
    if problems:
        raise PolicyError(problems)
    return parse(texts)


def _read(path: Path, texts: dict[str, str], problems: list[Problem]) -> None:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)  # never more: the file may be huge or endless
    except OSError as exc:
        problems.append(Problem(str(path), 0, "", f"cannot read: {exc}"))
        return
    if len(data) > MAX_FILE_BYTES:
        problems.append(Problem(str(path), 0, "", _too_large()))
        return
    try:
        texts[str(path)] = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(Problem(str(path), 0, "", f"cannot read: {exc}"))


def _too_large() -> str:
    return (
        f"file larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; a policy file is much "
        "smaller: split the policies over several files"
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; in a policy that hides a mistake.

    Also enforces :data:`MAX_DEPTH` while composing (before Python's recursion limit is near)
    and :data:`MAX_NODES` per file with aliases expanded (a YAML bomb is a small text whose
    aliases stand for billions of nodes; PyYAML shares them, but every consumer walks them)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels; a policy is far shallower",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            self._nodes += _expanded_size(node, {})
            if self._nodes > MAX_NODES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_NODES:,} YAML nodes once anchors and aliases are expanded "
                    "(a YAML bomb?); write the policy out or split it over several files",
                    node.start_mark,
                )
        return node


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Nodes ``node`` stands for, counting a node reached through N aliases N times. Linear in
    the distinct nodes (memoized); recursion depth is bounded by MAX_DEPTH."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, sizes) + _expanded_size(value, sizes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, sizes)
    sizes[id(node)] = size
    return size


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = str(node.value)
    if sum(ch.isalnum() for ch in text) > MAX_INT_DIGITS:
        raise yaml.constructor.ConstructorError(
            None, None, f"integer longer than {MAX_INT_DIGITS} digits", node.start_mark
        )
    return yaml.SafeLoader.construct_yaml_int(loader, node)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable keys: construct_mapping reports them
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _documents(file: str, text: str, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    index = 0
    if len(text) > MAX_FILE_BYTES:  # parse() may be handed texts that never were files
        problems.append(Problem(file, 0, "", _too_large()))
        return
    try:
        for document in yaml.load_all(text, Loader=_UniqueKeyLoader):
            index += 1
            yield index, document
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        detail = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.append(Problem(file, index + 1, "", f"invalid YAML{where}: {detail}"))
    except Exception as exc:  # PyYAML's constructors give up in many ways ("!!int " -> IndexError)
        reason = f"invalid YAML: a value does not fit its type ({type(exc).__name__}: {exc})"
        problems.append(Problem(file, index + 1, "", reason))


# --------------------------------------------------------------------------- parsing


@dataclass
class _Doc:
    file: str
    index: int
    data: dict[str, Any]
    kind: str

    @property
    def origin(self) -> Origin:
        return Origin(self.file, self.index)


def parse(texts: Mapping[str, str]) -> PolicySet:
    """Pure: ``{filename: yaml text}`` -> PolicySet, or PolicyError listing every problem."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    docs: list[_Doc] = []
    for file, text in texts.items():
        for index, data in _documents(file, text, problems):
            if data is None:
                continue
            doc = _classify(file, index, data, problems, warnings)
            if doc is not None:
                docs.append(doc)

    meshes = [d for d in docs if d.kind == "MeshConfig"]
    mesh = MeshConfig()
    for extra in meshes[1:]:
        problems.append(
            Problem(
                extra.file,
                extra.index,
                "kind",
                f"a second MeshConfig (the first is {meshes[0].origin}); keep exactly one",
            )
        )
    if meshes:
        mesh = _Reader(meshes[0], problems).mesh_config()

    workloads: list[Workload] = []
    policies: list[AuthorizationPolicy] = []
    peers: list[PeerAuthentication] = []
    requests: list[RequestAuthentication] = []
    for doc in docs:
        reader = _Reader(doc, problems, mesh)
        if doc.kind == "Workload":
            w = reader.workload()
            if w is not None:
                workloads.append(w)
        elif doc.kind == "AuthorizationPolicy":
            ap = reader.authorization_policy()
            if ap is not None:
                policies.append(ap)
        elif doc.kind == "PeerAuthentication":
            pa = reader.peer_authentication()
            if pa is not None:
                peers.append(pa)
        elif doc.kind == "RequestAuthentication":
            ra = reader.request_authentication()
            if ra is not None:
                requests.append(ra)

    for kind, items in (
        ("Workload", workloads),
        ("AuthorizationPolicy", policies),
        ("PeerAuthentication", peers),
        ("RequestAuthentication", requests),
    ):
        _check_duplicates(kind, items, problems)
    if problems:
        raise PolicyError(sorted(set(problems), key=_problem_order(texts)))
    return PolicySet.create(
        mesh=mesh,
        workloads=workloads,
        authorization_policies=policies,
        peer_authentications=peers,
        request_authentications=requests,
        warnings=tuple(warnings),
    )


def _problem_order(texts: Mapping[str, str]) -> Callable[[Problem], tuple[int, int, str, str]]:
    files = {name: i for i, name in enumerate(texts)}
    return lambda p: (files.get(p.file, -1), p.index, p.field, p.reason)


def _check_duplicates(kind: str, items: Sequence[Any], problems: list[Problem]) -> None:
    first: dict[tuple[str, str], Origin | None] = {}
    for item in items:
        key = (item.namespace, item.name)
        if key in first:
            origin: Origin | None = item.origin
            problems.append(
                Problem(
                    origin.file if origin else "?",
                    origin.index if origin else 0,
                    "metadata.name",
                    f"duplicate {kind} {key[0]}/{key[1]} (first defined at {first[key]})",
                )
            )
        else:
            first[key] = item.origin


def _classify(
    file: str, index: int, data: Any, problems: list[Problem], warnings: list[Problem]
) -> _Doc | None:
    if not isinstance(data, dict):
        problems.append(
            Problem(
                file, index, "", f"expected a mapping with apiVersion and kind, got {_type(data)}"
            )
        )
        return None
    kind = data.get("kind")
    api_version = data.get("apiVersion")
    if kind is None:
        problems.append(Problem(file, index, "kind", "missing (e.g. kind: AuthorizationPolicy)"))
        return None
    if not isinstance(kind, str):
        problems.append(Problem(file, index, "kind", f"expected a string, got {_type(kind)}"))
        return None
    if kind in SKIPPED_KINDS:
        return None
    if kind in ISTIO_KINDS:
        if not isinstance(api_version, str) or api_version not in ISTIO_API_VERSIONS:
            problems.append(
                Problem(
                    file,
                    index,
                    "apiVersion",
                    f"{api_version!r} is not supported for {kind}; use security.istio.io/v1 "
                    "(or v1beta1)",
                )
            )
            return None
    elif kind in MESHWARD_KINDS:
        if api_version != MESHWARD_API_VERSION:
            problems.append(
                Problem(
                    file,
                    index,
                    "apiVersion",
                    f"{api_version!r} is not supported for {kind}; use {MESHWARD_API_VERSION}",
                )
            )
            return None
    else:
        # An error, not a warning: `kind: AuthorisationPolicy` skipped with a warning was a DENY
        # policy silently not enforced, and `meshward xds serve` does not print warnings.
        known = (*ISTIO_KINDS, *MESHWARD_KINDS)
        hint = _suggest(kind, known, cutoff=0.8)
        problems.append(
            Problem(
                file,
                index,
                "kind",
                f"unknown kind {kind!r}{hint}; policy files hold {', '.join(known)} (and "
                "PolicyTests); keep other documents out of the policy directory",
            )
        )
        return None
    return _Doc(file, index, data, kind)


def _type(value: Any) -> str:
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


def _suggest(word: str, options: Collection[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Reads one document; every check appends to the shared problem list and carries on."""

    def __init__(self, doc: _Doc, problems: list[Problem], mesh: MeshConfig | None = None) -> None:
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
            self.error(path, f"expected a mapping, got {_type(value)}")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            field = f"{path}.{key}" if path else str(key)
            if not isinstance(key, str):
                self.error(field, "field names must be strings")
            elif key in allowed:
                out[key] = item
            elif key not in ignored:
                self.error(field, f"unknown field{_suggest(key, allowed)}")
        return out

    def string(self, value: Any, path: str, *, required: bool = False) -> str | None:
        if value is None:
            if required:
                self.error(path, "required")
            return None
        if not isinstance(value, str):
            self.error(path, f"expected a string, got {_type(value)}")
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
            port = _port(item)
            if port is None:
                self.error(f"{path}[{i}]", f"{item!r} is not a port number (1-65535)")
            else:
                out.append(port)
        return tuple(out)

    def labels(self, value: Any, path: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.error(path, f"expected a mapping of label names to values, got {_type(value)}")
            return {}
        out: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key:
                self.error(path, f"label name {key!r} must be a non-empty string")
            elif not isinstance(item, str):
                self.error(
                    f"{path}.{key}", f"label values are strings, got {_type(item)} (quote it)"
                )
            else:
                out[key] = item
        return out

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
        name = self.name(meta.get("name"), "metadata.name", _DNS_SUBDOMAIN, "name") or ""
        namespace = DEFAULT_NAMESPACE
        if namespaced and meta.get("namespace") is not None:
            namespace = (
                self.name(meta.get("namespace"), "metadata.namespace", _DNS_LABEL, "namespace")
                or DEFAULT_NAMESPACE
            )
        labels = self.labels(meta.get("labels"), "metadata.labels")
        annotations: dict[str, str] = {}
        raw = meta.get("annotations")
        if raw is not None:
            if not isinstance(raw, dict):
                self.error("metadata.annotations", f"expected a mapping, got {_type(raw)}")
            else:
                annotations = {str(k): v for k, v in raw.items()}
        return name, namespace, labels, annotations

    # ---- meshward.dev/v1

    def mesh_config(self) -> MeshConfig:
        data = self.doc.data
        self.mapping(data, "", ("apiVersion", "kind", "metadata", "spec"))
        self.mapping(data.get("metadata"), "metadata", METADATA_FIELDS, ignored=KUBERNETES_METADATA)
        spec = self.mapping(
            data.get("spec"),
            "spec",
            ("trustDomain", "rootNamespace", "denialDetails", "jwtEnforcement"),
        )
        trust_domain = DEFAULT_TRUST_DOMAIN
        root = DEFAULT_ROOT_NAMESPACE
        if "trustDomain" in spec:
            trust_domain = (
                self.name(spec["trustDomain"], "spec.trustDomain", _TRUST_DOMAIN, "trust domain")
                or DEFAULT_TRUST_DOMAIN
            )
        if "rootNamespace" in spec:
            root = (
                self.name(spec["rootNamespace"], "spec.rootNamespace", _DNS_LABEL, "namespace")
                or DEFAULT_ROOT_NAMESPACE
            )
        details = DenialDetails.QUIET
        text = self.string(spec.get("denialDetails"), "spec.denialDetails")
        if text is not None:
            try:
                details = DenialDetails(text)
            except ValueError:
                self.error(
                    "spec.denialDetails",
                    f"{text!r} is not one of {', '.join(d.value for d in DenialDetails)}",
                )
        enforcement = JwtEnforcement.NATIVE
        text = self.string(spec.get("jwtEnforcement"), "spec.jwtEnforcement")
        if text is not None:
            try:
                enforcement = JwtEnforcement(text)
            except ValueError:
                self.error(
                    "spec.jwtEnforcement",
                    f"{text!r} is not one of {', '.join(e.value for e in JwtEnforcement)}",
                )
        return MeshConfig(
            trust_domain=trust_domain,
            root_namespace=root,
            denial_details=details,
            jwt_enforcement=enforcement,
        )

    def workload(self) -> Workload | None:
        count = len(self.problems)
        name, namespace, labels, _ = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"), "spec", ("serviceAccount", "address", "ports")
        )
        service_account = name
        if spec.get("serviceAccount") is not None:
            service_account = (
                self.name(spec["serviceAccount"], "spec.serviceAccount", _DNS_SUBDOMAIN, "name")
                or name
            )
        address = "127.0.0.1"
        if spec.get("address") is not None:
            text = self.string(spec["address"], "spec.address", required=True)
            if text is not None:
                if _is_ip(text) or _DNS_SUBDOMAIN.match(text.lower()):
                    address = text
                else:
                    self.error("spec.address", f"{text!r} is not an IP address or host name")
        ports = self.workload_ports(spec.get("ports"))
        if len(self.problems) > count:
            return None
        return Workload(
            namespace=namespace,
            name=name,
            labels=labels,
            service_account=service_account,
            address=address,
            ports=ports,
            origin=self.doc.origin,
        )

    def workload_ports(self, value: Any) -> tuple[WorkloadPort, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error("spec.ports", f"expected a list of ports, got {_type(value)}")
            return ()
        out: list[WorkloadPort] = []
        seen_ports: set[int] = set()
        seen_names: set[str] = set()
        for i, item in enumerate(value):
            path = f"spec.ports[{i}]"
            entry = self.mapping(item, path, ("name", "port", "protocol"))
            raw_port = entry.get("port")
            port = _port(raw_port) if isinstance(raw_port, int | str) else None
            if port is None or isinstance(raw_port, bool):
                self.error(f"{path}.port", f"{raw_port!r} is not a port number (1-65535)")
                continue
            protocol = Protocol.HTTP
            if entry.get("protocol") is not None:
                text = self.string(entry["protocol"], f"{path}.protocol")
                if text is not None:
                    try:
                        protocol = Protocol(text.upper())
                    except ValueError:
                        self.error(
                            f"{path}.protocol",
                            f"{text!r} is not one of {', '.join(p.value for p in Protocol)}",
                        )
            name = f"{protocol.value.lower()}-{port}"
            if entry.get("name") is not None:
                name = self.name(entry["name"], f"{path}.name", _DNS_LABEL, "port name") or name
            if port in seen_ports:
                self.error(f"{path}.port", f"port {port} is listed twice")
            if name in seen_names:
                self.error(f"{path}.name", f"port name {name!r} is listed twice")
            seen_ports.add(port)
            seen_names.add(name)
            out.append(WorkloadPort(name=name, port=port, protocol=protocol))
        return tuple(out)

    # ---- security.istio.io

    def authorization_policy(self) -> AuthorizationPolicy | None:
        count = len(self.problems)
        name, namespace, _, annotations = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"),
            "spec",
            ("selector", "action", "provider", "rules", "targetRef", "targetRefs"),
        )
        for unsupported in ("targetRef", "targetRefs"):
            if unsupported in spec:
                self.error(
                    f"spec.{unsupported}",
                    "not supported (it binds policies to gateways and waypoints); "
                    "use spec.selector to pick sidecar workloads",
                )
        selector = self.selector(spec.get("selector"), "spec.selector")
        action = Action.ALLOW
        if spec.get("action") is not None:
            text = self.string(spec["action"], "spec.action")
            if text is not None:
                try:
                    action = Action(text)
                except ValueError:
                    self.error(
                        "spec.action",
                        f"{text!r} is not one of {', '.join(a.value for a in Action)}",
                    )
        provider: str | None = None
        if spec.get("provider") is not None:
            prov = self.mapping(spec["provider"], "spec.provider", ("name",))
            provider = self.string(prov.get("name"), "spec.provider.name", required=True)
        if action is Action.CUSTOM and provider is None and "provider" not in spec:
            self.error("spec.provider", "required when action is CUSTOM")
        if action is not Action.CUSTOM and "provider" in spec:
            self.error("spec.provider", "allowed only when action is CUSTOM")
        rules = self.rules(spec.get("rules"), namespace)
        dry_run = self.dry_run(annotations)
        if dry_run and action is Action.CUSTOM:
            self.error(
                f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                "dry-run is not supported for CUSTOM policies (as in Istio)",
            )
        expires_at = self.expires_at(annotations)
        if len(self.problems) > count:
            return None
        return AuthorizationPolicy(
            namespace=namespace,
            name=name,
            action=action,
            selector=selector,
            rules=rules,
            provider=provider,
            dry_run=dry_run,
            expires_at=expires_at,
            origin=self.doc.origin,
        )

    def dry_run(self, annotations: Mapping[str, Any]) -> bool:
        value = annotations.get(DRY_RUN_ANNOTATION)
        if value is None or isinstance(value, bool):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.error(
            f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
            f'expected "true" or "false", got {value!r}',
        )
        return False

    def expires_at(self, annotations: Mapping[str, Any]) -> datetime | None:
        value = annotations.get(EXPIRES_AT_ANNOTATION)
        field = f"metadata.annotations[{EXPIRES_AT_ANNOTATION}]"
        if value is None:
            return None
        parsed: datetime | None = None
        if isinstance(value, datetime):
            parsed = value
        elif isinstance(value, str) and ("T" in value or "t" in value):
            try:
                parsed = datetime.fromisoformat(value.upper())
            except ValueError:
                parsed = None
        if parsed is None:
            self.error(field, f"{value!r} is not an RFC 3339 timestamp (e.g. 2030-01-31T18:00:00Z)")
            return None
        if parsed.tzinfo is None:
            self.error(field, f"{value!r} needs a time zone (e.g. a trailing Z for UTC)")
            return None
        return parsed.astimezone(UTC)

    def rules(self, value: Any, namespace: str) -> tuple[Rule, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.error("spec.rules", f"expected a list of rules, got {_type(value)}")
            return ()
        return tuple(self.rule(item, f"spec.rules[{i}]", namespace) for i, item in enumerate(value))

    def rule(self, value: Any, path: str, namespace: str) -> Rule:
        data = self.mapping(value, path, ("from", "to", "when"))
        sources: list[Source] = []
        for i, item in enumerate(self.entries(data.get("from"), f"{path}.from")):
            entry = self.mapping(item, f"{path}.from[{i}]", ("source",))
            sources.append(self.source(entry.get("source"), f"{path}.from[{i}].source", namespace))
        operations: list[Operation] = []
        for i, item in enumerate(self.entries(data.get("to"), f"{path}.to")):
            entry = self.mapping(item, f"{path}.to[{i}]", ("operation",))
            operations.append(self.operation(entry.get("operation"), f"{path}.to[{i}].operation"))
        conditions = tuple(
            self.condition(item, f"{path}.when[{i}]")
            for i, item in enumerate(self.entries(data.get("when"), f"{path}.when"))
        )
        return Rule(sources=tuple(sources), operations=tuple(operations), conditions=conditions)

    def entries(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(path, f"expected a list, got {_type(value)}")
            return []
        return value

    def source(self, value: Any, path: str, namespace: str) -> Source:
        fields = (
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
            "serviceAccounts",
            "notServiceAccounts",
        )
        if value is None:
            self.error(path, "required (a `from` entry needs a source)")
            return Source()
        data = self.mapping(value, path, fields)
        if isinstance(value, dict) and set(value) <= set(fields) and not any(map(data.get, fields)):
            self.error(path, "must set at least one field")
        principals = self.principals(data.get("principals"), f"{path}.principals")
        not_principals = self.principals(data.get("notPrincipals"), f"{path}.notPrincipals")
        for field, twin, target in (
            ("serviceAccounts", "principals", principals),
            ("notServiceAccounts", "notPrincipals", not_principals),
        ):
            accounts = self.service_accounts(data.get(field), f"{path}.{field}", namespace)
            if accounts and target:
                self.error(
                    f"{path}.{field}",
                    f"cannot be combined with {twin} in one source (both name the peer identity)",
                )
            if field == "serviceAccounts":
                principals = principals + accounts
            else:
                not_principals = not_principals + accounts
        return Source(
            principals=principals,
            not_principals=not_principals,
            request_principals=self.patterns(
                data.get("requestPrincipals"), f"{path}.requestPrincipals"
            ),
            not_request_principals=self.patterns(
                data.get("notRequestPrincipals"), f"{path}.notRequestPrincipals"
            ),
            namespaces=self.patterns(data.get("namespaces"), f"{path}.namespaces"),
            not_namespaces=self.patterns(data.get("notNamespaces"), f"{path}.notNamespaces"),
            ip_blocks=self.networks(data.get("ipBlocks"), f"{path}.ipBlocks"),
            not_ip_blocks=self.networks(data.get("notIpBlocks"), f"{path}.notIpBlocks"),
            remote_ip_blocks=self.networks(data.get("remoteIpBlocks"), f"{path}.remoteIpBlocks"),
            not_remote_ip_blocks=self.networks(
                data.get("notRemoteIpBlocks"), f"{path}.notRemoteIpBlocks"
            ),
        )

    def principals(self, value: Any, path: str) -> tuple[str, ...]:
        items = self.patterns(value, path)
        return tuple(strip_spiffe(item) for item in items)

    def service_accounts(self, value: Any, path: str, namespace: str) -> tuple[str, ...]:
        out: list[str] = []
        for i, item in enumerate(self.str_list(value, path)):
            ns, slash, sa = item.rpartition("/")
            ns = ns if slash else namespace
            if "*" in item or not _DNS_LABEL.match(ns) or not _DNS_SUBDOMAIN.match(sa):
                self.error(
                    f"{path}[{i}]",
                    f"{item!r} is not a service account (NAMESPACE/NAME, or NAME in the "
                    "policy's namespace; no wildcards)",
                )
                continue
            out.append(f"{self.mesh.trust_domain}/ns/{ns}/sa/{sa}")
        return tuple(out)

    def operation(self, value: Any, path: str) -> Operation:
        fields = (
            "hosts",
            "notHosts",
            "ports",
            "notPorts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        )
        if value is None:
            self.error(path, "required (a `to` entry needs an operation)")
            return Operation()
        data = self.mapping(value, path, fields)
        if isinstance(value, dict) and set(value) <= set(fields) and not any(map(data.get, fields)):
            self.error(path, "must set at least one field")
        return Operation(
            hosts=self.patterns(data.get("hosts"), f"{path}.hosts"),
            not_hosts=self.patterns(data.get("notHosts"), f"{path}.notHosts"),
            ports=self.ports(data.get("ports"), f"{path}.ports"),
            not_ports=self.ports(data.get("notPorts"), f"{path}.notPorts"),
            methods=self.patterns(data.get("methods"), f"{path}.methods"),
            not_methods=self.patterns(data.get("notMethods"), f"{path}.notMethods"),
            paths=self.paths(data.get("paths"), f"{path}.paths"),
            not_paths=self.paths(data.get("notPaths"), f"{path}.notPaths"),
        )

    def paths(self, value: Any, path: str) -> tuple[str, ...]:
        items = self.str_list(value, path)
        for i, item in enumerate(items):
            problem = (
                check_path_template(item) if is_path_template(item) else wildcard_problem(item)
            ) or unanchored_path_problem(item)
            if problem:
                self.error(f"{path}[{i}]", problem)
        return items

    def condition(self, value: Any, path: str) -> Condition:
        data = self.mapping(value, path, ("key", "values", "notValues"))
        key = self.string(data.get("key"), f"{path}.key", required=True) or ""
        numbers = True  # YAML turns `values: [91]` into ints; Istio users mean the string
        values = self.str_list(data.get("values"), f"{path}.values", numbers=numbers)
        not_values = self.str_list(data.get("notValues"), f"{path}.notValues", numbers=numbers)
        if isinstance(value, dict) and not values and not not_values:
            self.error(path, "set values or notValues (or both)")
        if key:
            self.condition_key(key, f"{path}.key")
            for field, items in (("values", values), ("notValues", not_values)):
                self.condition_values(key, items, f"{path}.{field}")
        return Condition(key=key, values=values, not_values=not_values)

    def condition_key(self, key: str, path: str) -> None:
        if key.startswith("experimental."):
            self.error(
                path,
                f"unsupported key {key!r}: experimental.* keys match Envoy filter metadata, "
                "which Meshward sidecars do not expose; remove this condition",
            )
            return
        if key in IP_KEYS or key in PORT_KEYS or key in PLAIN_KEYS:
            return
        name = header_name(key)
        if name is not None:
            if not _HEADER_NAME.match(name):
                self.error(path, f"{name!r} is not a valid header name")
            return
        if claim_path(key) is not None:
            return
        known = sorted(
            {
                *IP_KEYS,
                *PORT_KEYS,
                *PLAIN_KEYS,
                "request.headers[NAME]",
                "request.auth.claims[NAME]",
            }
        )
        self.error(path, f"unknown key {key!r}{_suggest(key, known)}; known: {', '.join(known)}")

    def condition_values(self, key: str, items: tuple[str, ...], path: str) -> None:
        for i, item in enumerate(items):
            if key in IP_KEYS:
                try:
                    parse_network(item)
                except ValueError:
                    self.error(f"{path}[{i}]", f"{item!r} is not an IP address or CIDR block")
            elif key in PORT_KEYS:
                if _port(item) is None:
                    self.error(f"{path}[{i}]", f"{item!r} is not a port number (1-65535)")
            else:
                problem = wildcard_problem(item)
                if problem:
                    self.error(f"{path}[{i}]", problem)

    def peer_authentication(self) -> PeerAuthentication | None:
        count = len(self.problems)
        name, namespace, _, _ = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"), "spec", ("selector", "mtls", "portLevelMtls")
        )
        selector = self.selector(spec.get("selector"), "spec.selector")
        mode = self.mtls_mode(spec.get("mtls"), "spec.mtls")
        port_level: dict[int, MtlsMode] = {}
        raw = spec.get("portLevelMtls")
        if raw is not None:
            if not isinstance(raw, dict):
                self.error(
                    "spec.portLevelMtls", f"expected a mapping of port to mtls, got {_type(raw)}"
                )
            else:
                if selector is None:
                    self.error(
                        "spec.portLevelMtls",
                        "needs spec.selector (port-level modes apply to selected workloads only)",
                    )
                for key, item in raw.items():
                    port = _port(key) if isinstance(key, int | str) else None
                    if port is None:
                        self.error(f"spec.portLevelMtls[{key}]", "is not a port number (1-65535)")
                        continue
                    port_level[port] = self.mtls_mode(item, f"spec.portLevelMtls[{key}]")
        if len(self.problems) > count:
            return None
        return PeerAuthentication(
            namespace=namespace,
            name=name,
            selector=selector,
            mode=mode,
            port_level=port_level,
            origin=self.doc.origin,
        )

    def mtls_mode(self, value: Any, path: str) -> MtlsMode:
        data = self.mapping(value, path, ("mode",))
        text = self.string(data.get("mode"), f"{path}.mode")
        if text is None:
            return MtlsMode.UNSET
        try:
            return MtlsMode(text)
        except ValueError:
            self.error(
                f"{path}.mode", f"{text!r} is not one of {', '.join(m.value for m in MtlsMode)}"
            )
            return MtlsMode.UNSET

    def request_authentication(self) -> RequestAuthentication | None:
        count = len(self.problems)
        name, namespace, _, _ = self.metadata()
        spec = self.mapping(
            self.doc.data.get("spec"), "spec", ("selector", "jwtRules", "targetRef", "targetRefs")
        )
        for unsupported in ("targetRef", "targetRefs"):
            if unsupported in spec:
                self.error(f"spec.{unsupported}", "not supported; use spec.selector")
        selector = self.selector(spec.get("selector"), "spec.selector")
        rules: list[JwtRule] = []
        issuers: set[str] = set()
        for i, item in enumerate(self.entries(spec.get("jwtRules"), "spec.jwtRules")):
            rule = self.jwt_rule(item, f"spec.jwtRules[{i}]")
            if rule is None:
                continue
            if rule.issuer in issuers:
                self.error(f"spec.jwtRules[{i}].issuer", f"issuer {rule.issuer!r} is listed twice")
            issuers.add(rule.issuer)
            rules.append(rule)
        if len(self.problems) > count:
            return None
        return RequestAuthentication(
            namespace=namespace,
            name=name,
            selector=selector,
            jwt_rules=tuple(rules),
            origin=self.doc.origin,
        )

    def jwt_rule(self, value: Any, path: str) -> JwtRule | None:
        fields = (
            "issuer",
            "audiences",
            "jwksUri",
            "jwks",
            "fromHeaders",
            "fromParams",
            "outputPayloadToHeader",
            "forwardOriginalToken",
        )
        unsupported = ("fromCookies", "outputClaimToHeaders", "timeout")
        data = self.mapping(value, path, (*fields, *unsupported))
        for field in unsupported:
            if field in data:
                self.error(f"{path}.{field}", "supported by Istio but not (yet) by Meshward")
        issuer = self.string(data.get("issuer"), f"{path}.issuer", required=True)
        audiences = self.str_list(data.get("audiences"), f"{path}.audiences")
        jwks_uri = self.string(data.get("jwksUri"), f"{path}.jwksUri")
        if jwks_uri is not None and not re.match(r"^(https?://[^/\s]+|file:///\S+)", jwks_uri):
            self.error(f"{path}.jwksUri", f"{jwks_uri!r} is not an http(s):// or file:/// URL")
        jwks = self.string(data.get("jwks"), f"{path}.jwks")
        if jwks is not None:
            try:
                parsed = json.loads(jwks)
            except ValueError as exc:
                self.error(f"{path}.jwks", f"not valid JSON: {exc}")
            except RecursionError:
                self.error(f"{path}.jwks", "not a JWKS: JSON nested too deeply")
            else:
                if not isinstance(parsed, dict) or not isinstance(parsed.get("keys"), list):
                    self.error(f"{path}.jwks", 'expected a JWKS object: {"keys": [...]}')
        if jwks is None and jwks_uri is None:
            self.error(path, "set jwks (inline JSON) or jwksUri so tokens can be verified")
        headers: list[JwtHeader] = []
        for i, item in enumerate(self.entries(data.get("fromHeaders"), f"{path}.fromHeaders")):
            entry = self.mapping(item, f"{path}.fromHeaders[{i}]", ("name", "prefix"))
            header = self.string(entry.get("name"), f"{path}.fromHeaders[{i}].name", required=True)
            prefix = self.string(entry.get("prefix"), f"{path}.fromHeaders[{i}].prefix") or ""
            if header is not None:
                if not _HEADER_NAME.match(header):
                    self.error(f"{path}.fromHeaders[{i}].name", f"{header!r} is not a header name")
                headers.append(JwtHeader(name=header, prefix=prefix))
        params = self.str_list(data.get("fromParams"), f"{path}.fromParams")
        output = self.string(data.get("outputPayloadToHeader"), f"{path}.outputPayloadToHeader")
        if output is not None and not _HEADER_NAME.match(output):
            self.error(f"{path}.outputPayloadToHeader", f"{output!r} is not a header name")
        forward = data.get("forwardOriginalToken", False)
        if not isinstance(forward, bool):
            self.error(f"{path}.forwardOriginalToken", f"expected true or false, got {forward!r}")
            forward = False
        if issuer is None:
            return None
        return JwtRule(
            issuer=issuer,
            audiences=audiences,
            jwks_uri=jwks_uri,
            jwks=jwks,
            from_headers=tuple(headers),
            from_params=params,
            output_payload_to_header=output,
            forward_original_token=forward,
        )


def _port(value: int | str) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        # ASCII digits only: str.isdigit() also accepts "²" (int() refuses it) and "٣" (3).
        if not (value.isascii() and value.isdigit()) or len(value) > 5:
            return None
        value = int(value)
    return value if 1 <= value <= 65535 else None


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
