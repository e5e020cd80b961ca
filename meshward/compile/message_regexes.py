"""Every ``safe_regex`` regex in a compiled resource, read from the message itself.

The Envoy-limits backstop (:func:`meshward.compile.envoy_limits.resource_problems`) looked for
regexes in each resource's JSON form: a ``MessageToDict`` of every listener, route and cluster
of every workload was a quarter of a 1,000-service fleet's first compile. This walks the message
instead, skipping the sub-messages whose type cannot hold a regex (or an ``Any``), and finds the
same regexes in the same order (a test compares both over every compiled resource): a field
named ``safe_regex`` holding a non-empty ``regex``, inside ``Any`` too. What an ``Any`` holds
is looked up by its bytes (meshward.compile.anymemo): an RBAC engine an edit did not change is
not unpacked and walked again.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from meshward.compile.anymemo import AnyMemo

_ANY = "google.protobuf.Any"
# JSON-valued types: their contents are data, not matchers
_OPAQUE = frozenset(
    {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}
)
_REACHES: dict[str, bool] = {}
_IN_ANY: AnyMemo[tuple[str, ...]] = AnyMemo()


def message_regexes(message: Any) -> Iterator[str]:
    """The ``safe_regex`` regexes in ``message`` (duplicates included, in field order)."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == _ANY:
        type_url, value = message.type_url, message.value
        found = _IN_ANY.get(type_url, value)
        if found is None:
            from meshward.compile.protos import unpack

            found = _IN_ANY.put(type_url, value, tuple(message_regexes(unpack(message))))
        yield from found
        return
    if not _reaches(descriptor):
        return
    for field, value in message.ListFields():
        sub = field.message_type
        if sub is None:
            continue
        if sub.GetOptions().map_entry:
            if sub.fields_by_name["value"].message_type is not None:
                for key in value:
                    yield from message_regexes(value[key])
        elif field.is_repeated:
            for item in value:
                yield from message_regexes(item)
        elif field.name == "safe_regex" and getattr(value, "regex", ""):
            yield str(value.regex)
        else:
            yield from message_regexes(value)


def _reaches(descriptor: Any) -> bool:
    """Can a message of this type hold a ``safe_regex`` field or an ``Any``? (Cached per type;
    a type on a cycle counts as reaching while its answer is being worked out: conservative.)"""
    name = descriptor.full_name
    known = _REACHES.get(name)
    if known is not None:
        return known
    _REACHES[name] = True
    found = False
    for field in descriptor.fields:
        sub = field.message_type
        if sub is None:
            continue
        if sub.GetOptions().map_entry:
            sub = sub.fields_by_name["value"].message_type
            if sub is None:
                continue
        if field.name == "safe_regex" or sub.full_name == _ANY:
            found = True
            break
        if sub.full_name not in _OPAQUE and _reaches(sub):
            found = True
            break
    _REACHES[name] = found
    return found
