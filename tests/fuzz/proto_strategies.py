"""Hypothesis strategies for protobuf messages, built from their descriptors.

Every field may be left unset or get any value of its type (NaN and infinities for floats, the
whole range for integers, unknown numbers for enums, any text for strings), one member of each
oneof at most, and a few items for repeated fields. `overrides` replaces the strategy of chosen
fields (by full name, e.g. "chatfleet.v1.GenerateRequest.model") to steer values towards the
interesting ones: a model that exists, small token budgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

MAX_ITEMS = 4
MAX_TEXT = 40

Overrides = Mapping[str, st.SearchStrategy[Any]]

_F = FieldDescriptor
_INT_RANGES = {
    _F.TYPE_INT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _F.TYPE_INT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1),
    _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1),
    _F.TYPE_FIXED64: (0, 2**64 - 1),
}


def mostly(
    valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """`valid` three times in four: when every field may be wrong, a request with one bad field
    among many is rare otherwise, and so are requests that get past validation."""
    return st.one_of(valid, valid, valid, anything)


def uint32(small: int) -> st.SearchStrategy[int]:
    """Mostly 0..small, sometimes anything a uint32 holds."""
    return mostly(st.integers(0, small), st.integers(0, 2**32 - 1))


# Values that break arithmetic on float32: the smallest subnormal and normal numbers (dividing by
# them overflows), the largest finite one, infinities and NaN.
FLOAT32_EDGES = (0.0, -0.0, 1e-45, 1.2e-38, 1e-30, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan)


def float32(low: float, high: float) -> st.SearchStrategy[float]:
    """Mostly in [low, high]; otherwise an edge value or any float32."""
    edges = st.sampled_from([x for x in FLOAT32_EDGES if low <= x <= high] or [low])
    return st.one_of(
        st.floats(low, high, width=32),
        st.floats(low, high, width=32),
        edges,
        st.sampled_from(FLOAT32_EDGES),
        st.floats(width=32),
    )


def messages(
    descriptor: Descriptor, overrides: Overrides | None = None, *, depth: int = 3
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type; nested messages go `depth` levels deep at most."""
    return _message(descriptor, dict(overrides or {}), depth)


def _message(
    descriptor: Descriptor, overrides: Overrides, depth: int
) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    if depth <= 0:
        return st.just(cls())
    oneofs = [oneof for oneof in descriptor.oneofs if not _synthetic(oneof)]
    in_oneof = {field.name for oneof in oneofs for field in oneof.fields}
    plain = [field for field in descriptor.fields if field.name not in in_oneof]
    values = {field.name: _field(field, overrides, depth) for field in descriptor.fields}

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        fields: dict[str, Any] = {}
        for field in plain:
            if _is_map(field):
                fields[field.name] = draw(values[field.name])
            elif field.is_repeated:
                fields[field.name] = draw(st.lists(values[field.name], max_size=MAX_ITEMS))
            elif not field.has_presence or draw(st.booleans()):
                fields[field.name] = draw(values[field.name])
        for oneof in oneofs:
            # None last: hypothesis favours (and shrinks towards) the first choice.
            chosen = draw(st.sampled_from([*oneof.fields, None]))
            if chosen is not None:
                fields[chosen.name] = draw(values[chosen.name])
        return cls(**fields)

    return build()


def _field(field: FieldDescriptor, overrides: Overrides, depth: int) -> st.SearchStrategy[Any]:
    if field.full_name in overrides:
        return overrides[field.full_name]
    kind = field.type
    if _is_map(field):
        entry = field.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.dictionaries(
            _field(key, overrides, depth), _field(value, overrides, depth), max_size=MAX_ITEMS
        )
    if kind == _F.TYPE_MESSAGE:
        assert field.message_type is not None
        return _message(field.message_type, overrides, depth - 1)
    if kind == _F.TYPE_ENUM:
        assert field.enum_type is not None
        known = [value.number for value in field.enum_type.values]
        # proto3 enums are open: numbers the server does not know arrive as they are.
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.integers(low, high)
    if kind == _F.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == _F.TYPE_DOUBLE:
        return st.floats()
    if kind == _F.TYPE_BOOL:
        return st.booleans()
    if kind == _F.TYPE_STRING:
        return st.text(max_size=MAX_TEXT)
    if kind == _F.TYPE_BYTES:
        return st.binary(max_size=MAX_TEXT)
    raise NotImplementedError(f"no strategy for {field.full_name} (type {kind})")


def _is_map(field: FieldDescriptor) -> bool:
    """A `map<K, V>` field: a repeated entry message with the map_entry option."""
    entry = field.message_type
    return entry is not None and entry.GetOptions().map_entry


def _synthetic(oneof: Any) -> bool:
    """The oneof protoc makes for a proto3 `optional` field: presence, not a choice."""
    fields = list(oneof.fields)
    return len(fields) == 1 and oneof.name == f"_{fields[0].name}"
