"""The canonical form of a table's schema: the text every producer, in any language, sends
to the append check and that ``{prefix}:{<table>}:schema`` holds (docs/spec.md, "Canonical
schema").

Arrow libraries serialise one schema to different IPC bytes (field order inside the
flatbuffer, padding, metadata), so comparing IPC bytes makes a table created in one language
refuse appends from another. The canonical form is what two schemas must share to be the
same table schema: compact JSON, one object per field with the keys in a fixed (sorted)
order, every type written as its Arrow C Data Interface format string (a standard that every
Arrow implementation documents), nullability included. Left out on purpose:

* metadata (schema and field): it never reaches the Parquet files either;
* dictionary encoding: a dictionary column is its value type (an encoding, not a type;
  arrow-js encodes strings so by default);
* extension types: the storage type;
* the names of list and map children (Arrow does not enforce them): always ``item``,
  ``entries``, ``key``, ``value``; and a map's ``keys_sorted`` flag.

Only the types that deltaflush carries to Parquet have a canonical form (:data:`SUPPORTED`);
anything else raises ``UnsupportedData`` before a batch is sent.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from .errors import UnsupportedData

_SIMPLE: dict[pa.DataType, str] = {
    pa.null(): "n", pa.bool_(): "b",
    pa.int8(): "c", pa.uint8(): "C", pa.int16(): "s", pa.uint16(): "S",
    pa.int32(): "i", pa.uint32(): "I", pa.int64(): "l", pa.uint64(): "L",
    pa.float16(): "e", pa.float32(): "f", pa.float64(): "g",
    pa.binary(): "z", pa.large_binary(): "Z", pa.string(): "u", pa.large_string(): "U",
    pa.date32(): "tdD", pa.date64(): "tdm",
    pa.time32("s"): "tts", pa.time32("ms"): "ttm", pa.time64("us"): "ttu",
    pa.time64("ns"): "ttn",
}
_FROM_SIMPLE = {fmt: t for t, fmt in _SIMPLE.items()}
_UNITS = {"s": "s", "ms": "m", "us": "u", "ns": "n"}
_FROM_UNITS = {letter: unit for unit, letter in _UNITS.items()}
#: decimal bit width -> (pyarrow constructor, most digits); 128 is written without a width
_DECIMALS = {32: ("decimal32", 9), 64: ("decimal64", 18), 128: ("decimal128", 38),
             256: ("decimal256", 76)}
_DECIMAL = re.compile(r"d:([1-9][0-9]*),(-?(?:0|[1-9][0-9]*))(?:,(32|64|256))?")
_WIDTH = re.compile(r"[1-9][0-9]*")
_MAX_WIDTH = 2**31 - 1

#: What has a canonical form, for messages (and docs/spec.md, which lists the same).
SUPPORTED = ("null, bool, (u)int8-64, float16/32/64, decimal, (large) string and binary, "
             "fixed-size binary, date, time, timestamp, duration, (large/fixed-size) list, "
             "struct, map; dictionaries as their value type")


def canonical_schema(schema: pa.Schema) -> bytes:
    """The canonical form of ``schema``: UTF-8 JSON bytes, as docs/spec.md defines them.

    Raises ``UnsupportedData`` for a type deltaflush does not carry, two columns (or struct
    fields) of one name, or no column at all."""
    if not len(schema):
        raise UnsupportedData("a table needs at least one column")
    check_names(schema)
    return _dump(_fields("", schema))


def check_names(fields: Any, parent: str = "") -> None:
    """Raise ``UnsupportedData`` if the name of a column, or of a struct's field at any depth,
    is not valid UTF-8. A name is Unicode text (docs/spec.md, 6.2); pyarrow reads a payload
    whatever its names hold and decodes a name only when asked for it."""
    for i, f in enumerate(fields):
        try:
            name = f.name
        except UnicodeDecodeError as exc:
            where = f"struct {parent!r}" if parent else "the batch"
            raise UnsupportedData(
                f"column {i} of {where} has a name that is not valid UTF-8 ({exc}); a name "
                "must be Unicode text (docs/spec.md, 6.2)") from exc
        _check_type_names(name, f.type)


def _check_type_names(name: str, t: pa.DataType) -> None:
    if isinstance(t, pa.BaseExtensionType):
        _check_type_names(name, t.storage_type)
    elif pa.types.is_dictionary(t):
        _check_type_names(name, t.value_type)
    elif pa.types.is_struct(t):
        check_names(list(t), name)
    elif pa.types.is_map(t):
        _check_type_names(name, t.key_type)
        _check_type_names(name, t.item_type)
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        _check_type_names(name, t.value_type)


def schema_from_canonical(data: bytes | str) -> pa.Schema:
    """The pyarrow schema a canonical form describes (no metadata, no dictionaries).

    Raises ``ValueError`` if ``data`` is not a canonical form."""
    try:
        fields = json.loads(data)
        if not isinstance(fields, list):
            raise ValueError("not a JSON array")
        schema = pa.schema([_from_field(f) for f in fields])
        canonical_schema(schema)  # at least one field, names unique at every level (6.2)
        return schema
    except (ValueError, TypeError, KeyError, AttributeError, pa.ArrowException) as exc:
        raise ValueError(f"not a canonical schema ({exc}): {data[:200]!r}") from exc


def normalize(schema: pa.Schema) -> pa.Schema:
    """``schema`` as a table holds it: the schema of its canonical form."""
    return schema_from_canonical(canonical_schema(schema))


def same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """True if ``a`` and ``b`` have the same canonical form (e.g. a dictionary of strings
    and a string, or lists whose children are named differently)."""
    try:
        return _type("", a) == _type("", b)
    except UnsupportedData:
        return a.equals(b)


def _dump(value: Any) -> bytes:
    # Sorted keys, no whitespace, non-ASCII as UTF-8, and JSON's minimal escapes: `"`, `\`,
    # \b \f \n \r \t, other control characters as \u00xx (lowercase). That is what
    # JSON.stringify writes too; docs/spec.md pins it.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                      sort_keys=True).encode()


def _fields(parent: str, fields: Any) -> list[dict[str, Any]]:
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        where = f"struct {parent!r}" if parent else "the batch"
        raise UnsupportedData(f"{where} has two or more columns named {twice[0]!r}")
    return [_field(f.name, f.type, f.nullable) for f in fields]


def _field(name: str, t: pa.DataType, nullable: bool) -> dict[str, Any]:
    fmt, children = _type(name, t)
    return {"children": children, "name": name, "nullable": bool(nullable), "type": fmt}


def _type(name: str, t: pa.DataType) -> tuple[str, list[dict[str, Any]]]:
    if isinstance(t, pa.BaseExtensionType):
        return _type(name, t.storage_type)
    if pa.types.is_dictionary(t):
        return _type(name, t.value_type)
    if t in _SIMPLE:
        return _SIMPLE[t], []
    if pa.types.is_timestamp(t):
        return f"ts{_UNITS[t.unit]}:{t.tz or ''}", []
    if pa.types.is_duration(t):
        return f"tD{_UNITS[t.unit]}", []
    if pa.types.is_fixed_size_binary(t) and not pa.types.is_decimal(t):
        return f"w:{t.byte_width}", []
    if pa.types.is_decimal(t):
        bits = t.byte_width * 8
        return (f"d:{t.precision},{t.scale}" + ("" if bits == 128 else f",{bits}")), []
    if pa.types.is_map(t):
        entries = {"children": [_field("key", t.key_type, False),
                                _field("value", t.item_type, t.item_field.nullable)],
                   "name": "entries", "nullable": False, "type": "+s"}
        return "+m", [entries]
    if pa.types.is_fixed_size_list(t):
        return f"+w:{t.list_size}", [_field("item", t.value_type, t.value_field.nullable)]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        fmt = "+l" if pa.types.is_list(t) else "+L"
        return fmt, [_field("item", t.value_type, t.value_field.nullable)]
    if pa.types.is_struct(t):
        return "+s", _fields(name, list(t))
    raise UnsupportedData(f"column {name!r} has type {t}, which deltaflush does not carry "
                          f"(docs/spec.md); supported: {SUPPORTED}")


def _from_field(f: dict[str, Any]) -> pa.Field:
    name, fmt, nullable, children = f["name"], f["type"], f["nullable"], f["children"]
    if children == {}:  # an empty JSON object: Lua's JSON cannot tell it from []
        children = []
    if not isinstance(name, str) or not isinstance(fmt, str) or \
            not isinstance(nullable, bool) or not isinstance(children, list):
        raise ValueError(f"bad field {f!r}")
    return pa.field(name, _from_type(fmt, [_from_field(c) for c in children]), nullable)


def _from_type(fmt: str, children: list[pa.Field]) -> pa.DataType:
    if fmt in _FROM_SIMPLE and not children:
        return _FROM_SIMPLE[fmt]
    if fmt[:2] == "ts" and fmt[3:4] == ":" and fmt[2:3] in _FROM_UNITS and not children:
        return pa.timestamp(_FROM_UNITS[fmt[2]], tz=fmt[4:] or None)
    if fmt[:2] == "tD" and len(fmt) == 3 and fmt[2] in _FROM_UNITS and not children:
        return pa.duration(_FROM_UNITS[fmt[2]])
    if fmt.startswith("w:") and not children:
        return pa.binary(_width(fmt[2:]))
    decimal = _DECIMAL.fullmatch(fmt)
    if decimal and not children:
        make, most = _DECIMALS[int(decimal[3] or 128)]
        if int(decimal[1]) <= most:
            return getattr(pa, make)(int(decimal[1]), int(decimal[2]))  # type: ignore[no-any-return]
    if fmt == "+s":
        return pa.struct(children)
    if len(children) == 1:
        (child,) = children
        if fmt == "+l":
            return pa.list_(child.with_name("item"))
        if fmt == "+L":
            return pa.large_list(child.with_name("item"))
        if fmt.startswith("+w:"):
            return pa.list_(child.with_name("item"), _width(fmt[3:]))
        if fmt == "+m" and pa.types.is_struct(child.type) and child.type.num_fields == 2:
            key, value = child.type.field(0), child.type.field(1)
            return pa.map_(key.with_name("key").with_nullable(False),
                           value.with_name("value"))
    raise ValueError(f"unknown type {fmt!r} with {len(children)} children")


def _width(text: str) -> int:
    if not _WIDTH.fullmatch(text) or int(text) > _MAX_WIDTH:
        raise ValueError(f"not a width: {text!r}")
    return int(text)
