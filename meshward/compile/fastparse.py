"""Envoy's v3 JSON form (dicts) -> protobuf messages, fast, for what the compiler emits.

``json_format.ParseDict`` is generic pure Python: per message it rebuilds a field map, per field
it checks oneofs, extensions and every well-known type. At 1,000 services it was half of a
control plane's first compile (~10 s of CPU). The compiler's dicts use a small part of the JSON
mapping: plain fields, repeated fields, maps, enums by name, ``Any`` with ``@type``,
``Duration``, wrapper types and ``Struct``. Those are converted here with per-type field tables
built once; anything else (or anything odd) raises :class:`Unsupported` and the caller uses
``ParseDict``, so the result never depends on which path ran: a test compares the bytes of both
over every resource of a fleet's compile.

Each ``Any`` is packed with deterministic serialization, inner first, as
:func:`meshward.compile.protos._repack` does after ``ParseDict``.

:class:`Reuse` carries the ``Any`` values of the same resource's previous parse: an ``Any``
whose JSON form equals one of them takes its packed bytes instead of being parsed again. A
mesh-wide DENY changes one RBAC engine of every workload's route; the other engines (most of
the route) are then not parsed again. Equality is Python's (``==``), which also equates
``True`` with ``1`` and ``1`` with ``1.0``: the fast path refuses a value of the wrong type for
its field (:func:`_scalar`), so only a ``Struct`` value could tell them apart, and the compiler
emits each such value from one code path, of one type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor

_ANY = "google.protobuf.Any"
_DURATION = "google.protobuf.Duration"
_STRUCT = "google.protobuf.Struct"
_WRAPPERS = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "BoolValue", "Int32Value", "UInt32Value", "Int64Value", "UInt64Value", "StringValue",
    )
)  # fmt: skip
_OTHER_WKT = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "FieldMask", "ListValue", "Timestamp", "Value", "DoubleValue", "FloatValue",
        "BytesValue",
    )
)  # fmt: skip
_INTS = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)

# field kinds
_SCALAR, _ENUM, _MESSAGE, _REPEATED_SCALAR, _REPEATED_ENUM, _REPEATED_MESSAGE, _MAP, _OTHER = range(
    8
)


#: type URL -> (an ``Any``'s JSON form, its packed value) for each ``Any`` of one parse
Anys = dict[str, list[tuple[dict[str, Any], bytes]]]


#: The most ``Any`` values of one type a parse records for the next: each new ``Any`` is
#: compared with at most this many (a resource with thousands of them stays linear).
REUSE_PER_TYPE = 64


class Reuse:
    """The ``Any`` values of a previous parse (``before``) and those of this one (``after``,
    for the next; at most REUSE_PER_TYPE of each type)."""

    __slots__ = ("after", "before")

    def __init__(self, before: Anys) -> None:
        self.before = before
        self.after: Anys = {}


class Unsupported(Exception):
    """This dict uses JSON mapping features the fast path does not convert."""


class _Field:
    __slots__ = ("field", "kind", "map_value", "name", "python_type", "sub")

    def __init__(self, field: FieldDescriptor) -> None:
        self.name = field.name
        self.field = field
        self.sub: Descriptor | None = field.message_type
        self.map_value: FieldDescriptor | None = None
        repeated = field.is_repeated
        if self.sub is not None and self.sub.GetOptions().map_entry:
            self.kind = _MAP
            key = self.sub.fields_by_name["key"]
            self.map_value = self.sub.fields_by_name["value"]
            if key.cpp_type != FieldDescriptor.CPPTYPE_STRING or (
                self.map_value.message_type is None
                and self.map_value.cpp_type != FieldDescriptor.CPPTYPE_STRING
            ):
                self.kind = _OTHER  # maps with other keys or scalar values: not emitted
        elif self.sub is not None:
            self.kind = _REPEATED_MESSAGE if repeated else _MESSAGE
        elif field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            self.kind = _REPEATED_ENUM if repeated else _ENUM
        else:
            self.kind = _REPEATED_SCALAR if repeated else _SCALAR
        self.python_type = _python_type(field)


def _python_type(field: FieldDescriptor) -> type | None:
    """The JSON value type taken as is (None: not a plain scalar)."""
    if field.cpp_type in _INTS:
        return int
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return bool
    if (
        field.cpp_type == FieldDescriptor.CPPTYPE_STRING
        and field.type != FieldDescriptor.TYPE_BYTES
    ):
        return str
    return None


_TABLES: dict[str, dict[str, _Field]] = {}


def _table(descriptor: Descriptor) -> dict[str, _Field]:
    table = _TABLES.get(descriptor.full_name)
    if table is None:
        table = {}
        for field in descriptor.fields:
            entry = _Field(field)
            table[field.json_name] = entry
            table.setdefault(field.name, entry)
        _TABLES[descriptor.full_name] = table
    return table


def _scalar(entry: _Field, value: Any) -> Any:
    wanted = entry.python_type
    # bool is an int subclass: an int field given True is not what the compiler means
    if wanted is None or type(value) is not wanted:
        raise Unsupported(f"{entry.field.full_name}: {type(value).__name__}")
    return value


def _enum(entry: _Field, value: Any) -> int:
    if type(value) is not str:
        raise Unsupported("enum by number")
    found = entry.field.enum_type.values_by_name.get(value)
    if found is None:
        raise Unsupported(f"unknown enum value {value!r}")
    number: int = found.number
    return number


def parse(data: dict[str, Any], message: Any, reuse: Reuse | None = None) -> Any:
    """Fill ``message`` from ``data``; Unsupported (``message`` then half filled: discard it)
    when ``data`` needs the general converter. ``reuse``: see :class:`Reuse`."""
    _message(data, message, reuse)
    return message


def _message(data: Any, message: Any, reuse: Reuse | None) -> None:
    descriptor = message.DESCRIPTOR
    name = descriptor.full_name
    if name in _OTHER_WKT:
        raise Unsupported(name)
    if name == _ANY:
        _any(data, message, reuse)
        return
    if name == _DURATION:
        if type(data) is not str:
            raise Unsupported("duration")
        message.FromJsonString(data)
        return
    if name == _STRUCT:
        if type(data) is not dict:
            raise Unsupported("struct")
        message.update(data)
        return
    if name in _WRAPPERS:
        message.value = _scalar(_table(descriptor)["value"], data)
        return
    if type(data) is not dict:
        raise Unsupported(f"{name}: not an object")
    table = _table(descriptor)
    oneofs: set[str] = set()
    for key, value in data.items():
        entry = table.get(key)
        if entry is None or value is None:
            raise Unsupported(f"{name}.{key}")
        oneof = entry.field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs:
                raise Unsupported("two fields of one oneof")
            oneofs.add(oneof.name)
        kind = entry.kind
        if kind == _SCALAR:
            setattr(message, entry.name, _scalar(entry, value))
        elif kind == _MESSAGE:
            sub = getattr(message, entry.name)
            sub.SetInParent()
            _message(value, sub, reuse)
        elif kind == _REPEATED_MESSAGE:
            if type(value) is not list:
                raise Unsupported("repeated: not a list")
            items = getattr(message, entry.name)
            for item in value:
                _message(item, items.add(), reuse)
        elif kind == _ENUM:
            setattr(message, entry.name, _enum(entry, value))
        elif kind == _REPEATED_SCALAR:
            if type(value) is not list:
                raise Unsupported("repeated: not a list")
            getattr(message, entry.name).extend([_scalar(entry, item) for item in value])
        elif kind == _REPEATED_ENUM:
            if type(value) is not list:
                raise Unsupported("repeated: not a list")
            getattr(message, entry.name).extend([_enum(entry, item) for item in value])
        elif kind == _MAP:
            _map(entry, value, getattr(message, entry.name), reuse)
        else:
            raise Unsupported(f"{name}.{key}")


def _map(entry: _Field, value: Any, target: Any, reuse: Reuse | None) -> None:
    if type(value) is not dict:
        raise Unsupported("map: not an object")
    assert entry.map_value is not None
    if entry.map_value.message_type is not None:
        for key, item in value.items():
            if item is None:
                raise Unsupported("null map value")
            _message(item, target[key], reuse)
    else:
        for key, item in value.items():
            if type(item) is not str:
                raise Unsupported("map value")
            target[key] = item


_CLASSES: dict[str, Callable[[], Any]] = {}


def _any(data: Any, message: Any, reuse: Reuse | None) -> None:
    if type(data) is not dict or not data:
        raise Unsupported("empty or odd Any")
    type_url = data.get("@type")
    if type(type_url) is not str:
        raise Unsupported("Any without @type")
    if reuse is not None and len(data) > 1:  # an empty one costs less to parse than to find
        for before, value in reuse.before.get(type_url, ()):
            if before == data:
                message.type_url = type_url
                message.value = value
                _record(reuse, type_url, data, value)
                return
    make = _CLASSES.get(type_url)
    if make is None:
        full_name = type_url.rsplit("/", 1)[-1]
        descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
        if full_name in _OTHER_WKT or full_name in _WRAPPERS or full_name in (_ANY, _DURATION):
            raise Unsupported("well-known type in an Any")
        if full_name == _STRUCT:
            raise Unsupported("Struct in an Any")
        make = _CLASSES[type_url] = message_factory.GetMessageClass(descriptor)
    inner = make()
    _message({k: v for k, v in data.items() if k != "@type"}, inner, reuse)
    message.type_url = type_url
    message.value = inner.SerializeToString(deterministic=True)
    if reuse is not None and len(data) > 1:
        _record(reuse, type_url, data, message.value)


def _record(reuse: Reuse, type_url: str, data: dict[str, Any], value: bytes) -> None:
    kept = reuse.after.setdefault(type_url, [])
    if len(kept) < REUSE_PER_TYPE:
        kept.append((data, value))
