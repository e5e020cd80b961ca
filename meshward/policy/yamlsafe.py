"""Hardened YAML: PyYAML's safe loader with limits on size, depth, nodes (aliases expanded) and
integer length, and no silently repeated keys, so a hostile or broken file is a clear problem,
never minutes of CPU, a stack overflow or a billion-node bomb.

Scanning and parsing run in libyaml (PyYAML's C ``CParser``, where PyYAML was built with it)
under PyYAML's own Python composer and safe constructor, which carry the limits: a 60-document
policy file loads ~6x faster than with the pure-Python scanner (the policy watcher parses the
edited file on every change), into the same objects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import yaml

from meshward.policy.errors import Problem

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


def too_large() -> str:
    return (
        f"file larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; a policy file is much "
        "smaller: split the policies over several files"
    )


def _base() -> type[yaml.SafeLoader]:
    try:
        from yaml._yaml import CParser
    except ImportError:  # PyYAML without libyaml: the pure-Python scanner and parser
        return yaml.SafeLoader

    class CEventsLoader(
        yaml.composer.Composer, CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver
    ):
        """libyaml's events, PyYAML's composer (first in the MRO: CParser has a composer of its
        own, in C, which the limits below could not hook), safe constructor and resolver."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    return CEventsLoader  # type: ignore[return-value]  # a SafeLoader in all but its parser


if TYPE_CHECKING:
    _Base = yaml.SafeLoader
else:
    _Base = _base()


class _UniqueKeyLoader(_Base):
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


def documents(file: str, text: str, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    index = 0
    if len(text) > MAX_FILE_BYTES:  # parse() may be handed texts that never were files
        problems.append(Problem(file, 0, "", too_large()))
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
