"""YAML in, validated model out. Every problem in every document is collected before failing,
each named by file, document index and field path, so one run of `meshward policy validate`
shows the whole repair list."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshward.policy.errors import PolicyError, Problem
from meshward.policy.files import policy_files, read_file
from meshward.policy.model import (
    AuthorizationPolicy,
    MeshConfig,
    Origin,
    PeerAuthentication,
    RequestAuthentication,
    Workload,
)
from meshward.policy.policyset import PolicySet
from meshward.policy.schema.authn import AuthnSchema
from meshward.policy.schema.authz import AuthzSchema
from meshward.policy.schema.base import Doc, did_you_mean, type_name
from meshward.policy.schema.mesh import MeshSchema
from meshward.policy.yamlsafe import documents

ISTIO_API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
MESHWARD_API_VERSION = "meshward.dev/v1"
ISTIO_KINDS = ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication")
MESHWARD_KINDS = ("Workload", "MeshConfig")
# Documents that live beside policies but are not policy: `meshward policy test` case tables.
SKIPPED_KINDS = frozenset({"PolicyTests"})


def load(paths: Sequence[str | Path], *, cache: ParseCache | None = None) -> PolicySet:
    """Read policy files and directories (see :func:`policy_files`) and parse them as one set;
    ``cache``: see :func:`parse`."""
    texts: dict[str, str] = {}
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = policy_files([path])
            if not found:
                problems.append(Problem(str(path), 0, "", "directory holds no *.yaml or *.yml"))
            for file in found:
                read_file(file, texts, problems)
        elif path.exists():
            read_file(path, texts, problems)
        else:
            problems.append(Problem(str(path), 0, "", "no such file or directory"))
    if problems:
        raise PolicyError(problems)
    return parse(texts, cache=cache)


@dataclass(frozen=True)
class _Split:
    """One file's text as YAML documents, classified (what does not depend on other files)."""

    text: str
    docs: tuple[Doc, ...]
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]


@dataclass(frozen=True)
class _Read:
    """One file's documents read into model objects under one MeshConfig (the reader's
    defaults and checks depend on it)."""

    text: str
    mesh: MeshConfig
    items: tuple[tuple[str, Any], ...]  # (kind, model object) in document order
    problems: tuple[Problem, ...]


@dataclass
class ParseCache:
    """What :func:`parse` learnt about each file, reused while the file's text is unchanged:
    with it a one-file edit in a large policy directory re-parses one file's YAML, not all of
    it (the policy watcher keeps one). Keyed by file name and checked against the whole text,
    so a stale entry can never be used; bounded by the files of the last parse (entries of
    files no longer given are dropped). The result is the same PolicySet, version included,
    as a parse without a cache."""

    split: dict[str, _Split] = field(default_factory=dict)
    read: dict[str, _Read] = field(default_factory=dict)
    parsed_files: int = 0  # files whose YAML was parsed (not reused): what a test can check

    def retain(self, files: Iterable[str]) -> None:
        keep = set(files)
        self.split = {k: v for k, v in self.split.items() if k in keep}
        self.read = {k: v for k, v in self.read.items() if k in keep}


def _split(file: str, text: str, cache: ParseCache | None) -> _Split:
    cached = cache.split.get(file) if cache is not None else None
    if cached is not None and cached.text == text:
        return cached
    problems: list[Problem] = []
    warnings: list[Problem] = []
    docs: list[Doc] = []
    for index, data in documents(file, text, problems):
        if data is None:
            continue
        doc = _classify(file, index, data, problems, warnings)
        if doc is not None:
            docs.append(doc)
    result = _Split(text, tuple(docs), tuple(problems), tuple(warnings))
    if cache is not None:
        cache.split[file] = result
        cache.parsed_files += 1
    return result


def _read(file: str, split: _Split, mesh: MeshConfig, cache: ParseCache | None) -> _Read:
    cached = cache.read.get(file) if cache is not None else None
    if cached is not None and cached.text == split.text and cached.mesh == mesh:
        return cached
    problems: list[Problem] = []
    items: list[tuple[str, Any]] = []
    for doc in split.docs:
        reader = _Reader(doc, problems, mesh)
        item: Any = None
        if doc.kind == "Workload":
            item = reader.workload()
        elif doc.kind == "AuthorizationPolicy":
            item = reader.authorization_policy()
        elif doc.kind == "PeerAuthentication":
            item = reader.peer_authentication()
        elif doc.kind == "RequestAuthentication":
            item = reader.request_authentication()
        if item is not None:
            items.append((doc.kind, item))
    result = _Read(split.text, mesh, tuple(items), tuple(problems))
    if cache is not None:
        cache.read[file] = result
    return result


def parse(texts: Mapping[str, str], *, cache: ParseCache | None = None) -> PolicySet:
    """Pure: ``{filename: yaml text}`` -> PolicySet, or PolicyError listing every problem.
    ``cache``: reuse the YAML and model objects of files whose text is unchanged since the last
    parse with it (same result, a fraction of the work after a one-file edit)."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    docs: list[Doc] = []
    splits: dict[str, _Split] = {}
    for file, text in texts.items():
        split = _split(file, text, cache)
        splits[file] = split
        problems.extend(split.problems)
        warnings.extend(split.warnings)
        docs.extend(split.docs)
    if cache is not None:
        cache.retain(texts)

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
    by_kind: dict[str, list[Any]] = {
        "Workload": workloads,
        "AuthorizationPolicy": policies,
        "PeerAuthentication": peers,
        "RequestAuthentication": requests,
    }
    for file, split in splits.items():
        read = _read(file, split, mesh, cache)
        problems.extend(read.problems)
        for kind, item in read.items:
            by_kind[kind].append(item)

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
) -> Doc | None:
    if not isinstance(data, dict):
        problems.append(
            Problem(
                file,
                index,
                "",
                f"expected a mapping with apiVersion and kind, got {type_name(data)}",
            )
        )
        return None
    kind = data.get("kind")
    api_version = data.get("apiVersion")
    if kind is None:
        problems.append(Problem(file, index, "kind", "missing (e.g. kind: AuthorizationPolicy)"))
        return None
    if not isinstance(kind, str):
        problems.append(Problem(file, index, "kind", f"expected a string, got {type_name(kind)}"))
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
        hint = did_you_mean(kind, known, cutoff=0.8)
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
    return Doc(file, index, data, kind)


class _Reader(MeshSchema, AuthzSchema, AuthnSchema):
    """Reads one document of any kind; every check appends to the shared problem list and
    carries on."""
