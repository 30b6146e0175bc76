"""Which Arrow types every reader the README names can read, and what a table writes instead.

A Parquet file with one column Spark cannot read is unreadable to Spark as a whole, even
when the query selects other columns. So a table that is ``spark_compatible`` (the default,
see ``producer.tablecfg.TableConfig``) writes each column as a type every reader takes, or
refuses the column before anything of it is written:

========================================  ==================================================
Arrow type                                a ``spark_compatible`` table
========================================  ==================================================
``timestamp`` in s, ms or ns (any time    written as ``timestamp[us]``, Spark's own unit
zone, nested too)                         (Spark refuses nanoseconds). Digits below a
                                          microsecond are dropped (truncated toward zero).
``halffloat``                             written as ``float32``: the same values
``arrow.uuid``                            written as ``fixed_size_binary(16)``: the same bytes
``time32``, ``time64``                    refused: Spark before 4.1 reads no Parquet TIME
                                          column (4.1 only ``time64[us]``)
``decimal`` over 38 digits                refused: Spark and polars reject it
column names equal but for case           refused: Spark resolves names case-insensitively
                                          and rejects the file
unsigned integers                         kept (Spark 3.2+ reads them, ``uint64`` as
                                          ``decimal(20,0)``); ``table show`` notes it
========================================  ==================================================

Types Parquet cannot store at all (intervals, unions) are refused whatever the setting.
Without ``spark_compatible`` every other type is written as it is, and ``deltaflush table
show`` lists the columns some readers reject.

**Lake tables and unsigned 64-bit integers.** Neither Iceberg nor Delta Lake has unsigned
integers: their tables write a ``uint64`` column as ``long`` (signed 64-bit), which holds
every value up to 2**63-1. A batch with a larger value cannot go into an ``iceberg`` or
``delta`` table without changing it, so ``append`` refuses it (``values_refusal``: the
value, the column and the fix), and a flush sets such an entry aside as a dead letter with
that message (a producer in another language). Columns whose values fit are written as
they are; a ``parquet`` table keeps ``uint64`` whole.

**Types a lake table has none for.** Iceberg and Delta Lake have no durations and no
decimals over 38 digits, and Delta Lake no times (nested ones included): a batch with such
a column is refused by ``append`` to a table of that format (``format_refusal``), whatever
``spark_compatible`` says, and set aside as a dead letter by a flush if it gets in anyway.

A refusal happens at ``configure`` and ``append`` (``AppendCheck``), before anything is
written. A batch that reaches a flush anyway (a producer in another language, or a race
with ``configure``) is set aside as a dead letter with the same message, never lost:
``deltaflush dead replay`` re-appends it once the table or the batch is fixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import wire
from .errors import UnsupportedType
from .tablecfg import TableConfig

CONVERT, REFUSE, NOTE = "convert", "refuse", "note"

_SPARK_OFF = ("or, if Spark never reads this table, give it spark_compatible=False before "
              "its first flush (deltaflush table set {table} --spark-compatible false)")


@dataclass(frozen=True)
class Finding:
    """One column that a reader would reject or read differently, and what is done."""

    column: str
    type: str
    action: str  # CONVERT (written as ``written_as``), REFUSE, or NOTE (written as it is)
    reason: str
    written_as: str = ""
    fix: str = ""

    def __str__(self) -> str:
        if self.action == CONVERT:
            return f"{self.column} ({self.type}): written as {self.written_as}; {self.reason}"
        return f"{self.column} ({self.type}): {self.reason}"


@dataclass(frozen=True)
class _Issue:
    column: str
    type: str
    reason: str
    fix: str
    written_as: str = ""  # what a spark_compatible table writes instead ("": refused)
    note: bool = False  # readable by current readers; only worth a mention


def _safe_type(t: pa.DataType) -> pa.DataType:
    """``t`` with every part Spark rejects replaced by what a spark_compatible table writes."""
    if pa.types.is_timestamp(t):
        return t if t.unit == "us" else pa.timestamp("us", t.tz)
    if pa.types.is_float16(t):
        return pa.float32()
    if getattr(t, "extension_name", None) == "arrow.uuid":
        return t.storage_type
    if pa.types.is_dictionary(t):
        value = _safe_type(t.value_type)
        return t if value.equals(t.value_type) else value  # decoded: the values are cast
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_safe_type(t.key_type)),
                       t.item_field.with_type(_safe_type(t.item_type)), t.keys_sorted)
    if pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_safe_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_safe_type(t.value_type)), t.list_size)
    if pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_safe_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_safe_type(f.type)) for f in t])
    return t


def _issues(t: pa.DataType, path: str) -> list[_Issue]:
    """What readers reject in ``t`` (a column at ``path``), nested types included."""
    name = str(t)
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return [_Issue(path, name, "Spark reads no nanosecond timestamps",
                       "cast it to timestamp[us]", str(_safe_type(t)))]
    if pa.types.is_float16(t):
        return [_Issue(path, name, "Spark reads no half floats", "cast it to float32",
                       str(_safe_type(t)))]
    if getattr(t, "extension_name", None) == "arrow.uuid":
        return [_Issue(path, name, "Spark reads no Parquet UUID columns",
                       "cast it to fixed_size_binary(16) or a string", str(_safe_type(t)))]
    if pa.types.is_time(t):
        return [_Issue(path, name, "Spark before 4.1 reads no Parquet TIME columns (4.1 only "
                       "time64[us])", "cast it to a string or to int64 (e.g. microseconds "
                       "since midnight)")]
    if pa.types.is_decimal(t) and t.precision > 38:
        return [_Issue(path, name, "Spark and polars read no decimals over 38 digits",
                       "cast it to decimal128(38, scale) if its values fit, or to a string")]
    if pa.types.is_unsigned_integer(t):
        return [_Issue(path, name, "Spark before 3.2 reads no unsigned integers (3.2+ reads "
                       "uint64 as decimal(20,0))", "", note=True)]
    if pa.types.is_dictionary(t):
        return _issues(t.value_type, path)
    if pa.types.is_map(t):
        return _issues(t.key_type, f"{path}.key") + _issues(t.item_type, f"{path}.value")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _issues(t.value_type, f"{path}[]")
    if pa.types.is_struct(t):
        return [i for f in t for i in _issues(f.type, f"{path}.{f.name}")] \
            + _case_clashes([f.name for f in t], path + ".")
    return []


def _case_clashes(names: list[str], prefix: str = "") -> list[_Issue]:
    seen: dict[str, str] = {}
    out = []
    for name in names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            out.append(_Issue(prefix + name, f"beside {prefix}{other}",
                              "Spark resolves column names case-insensitively and rejects "
                              "names equal but for case", f"rename {prefix + name!r}"))
    return out


@functools.lru_cache(maxsize=512)
def findings(schema: pa.Schema, spark_compatible: bool = True) -> tuple[Finding, ...]:
    """Every column of ``schema`` that some reader rejects or reads differently, and what a
    table with this ``spark_compatible`` setting does with it."""
    out = []
    issues = [i for f in schema for i in _issues(f.type, f.name)] + _case_clashes(schema.names)
    for issue in issues:
        if issue.note:
            out.append(Finding(issue.column, issue.type, NOTE, issue.reason))
            continue
        if not spark_compatible:  # written as it is: some readers reject it
            action, written = NOTE, ""
        else:
            action, written = (CONVERT if issue.written_as else REFUSE), issue.written_as
        out.append(Finding(issue.column, issue.type, action, issue.reason, written, issue.fix))
    unwritable = _parquet_refusal(write_schema(schema, spark_compatible))
    if unwritable:
        out.append(Finding("*", "", REFUSE, f"Parquet cannot store it: {unwritable}",
                           fix="cast the column to a type Parquet has"))
    return tuple(out)


def _parquet_refusal(schema: pa.Schema) -> str | None:
    """Why the Parquet writer cannot take ``schema``, or None."""
    try:
        pq.ParquetWriter(pa.BufferOutputStream(), schema).close()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        return str(exc)
    return None


def write_schema(schema: pa.Schema, spark_compatible: bool) -> pa.Schema:
    """The schema a table's files get for batches of ``schema``."""
    if not spark_compatible:
        return schema
    return pa.schema([f.with_type(_safe_type(f.type)) for f in schema], schema.metadata)


def spark_safe(schema: pa.Schema, config: TableConfig
               ) -> tuple[pa.Schema, Callable[[pa.Table], pa.Table]]:
    """``(write schema, cast)``: the schema of the files a table with ``config`` writes for
    batches of ``schema``, and the function that brings such a batch to it (the identity
    when nothing changes, so the common case costs nothing)."""
    target = write_schema(schema, config.spark_compatible)
    if target.equals(schema):
        return schema, _same
    # safe=False lets nanoseconds be truncated to microseconds, the documented conversion;
    # the other conversions (float16 -> float32, uuid -> its bytes) are exact anyway.
    return target, lambda table: table.cast(target, safe=False)


def _same(table: pa.Table) -> pa.Table:
    return table


def refusal(schema: pa.Schema, spark_compatible: bool, table: str) -> UnsupportedType | None:
    """The error that refuses a batch (or a setting) of ``schema`` for ``table``, or None."""
    for f in findings(schema, spark_compatible):
        if f.action == REFUSE:
            spark = spark_compatible and f.column != "*"
            fix = f.fix + (", " + _SPARK_OFF.format(table=table) if spark else "")
            return UnsupportedType(table, f.column, f.type, f.reason, fix)
    return None


#: The formats whose tables have no unsigned 64-bit integers (see the module doc).
LAKE_FORMATS = ("iceberg", "delta")
#: The largest value of the signed 64-bit ``long`` a lake table writes ``uint64`` as.
LONG_MAX = 2**63 - 1


@functools.lru_cache(maxsize=512)
def has_uint64(schema: pa.Schema) -> bool:
    """Whether ``schema`` has a ``uint64`` anywhere (nested too)."""
    return any(contains(f.type, pa.types.is_uint64) for f in schema)


def contains(t: pa.DataType, test: Callable[[pa.DataType], bool]) -> bool:
    """Whether ``t``, or a type nested in it (a dictionary's values, a map's keys or items,
    a list's values, a struct's fields), passes ``test``."""
    if test(t):
        return True
    if pa.types.is_dictionary(t):
        return contains(t.value_type, test)
    if pa.types.is_map(t):
        return contains(t.key_type, test) or contains(t.item_type, test)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return contains(t.value_type, test)
    if pa.types.is_struct(t):
        return any(contains(f.type, test) for f in t)
    return False


def over_long(data: pa.Table) -> tuple[str, int] | None:
    """The first ``uint64`` column (a nested one as ``col.field``, ``col[]``) holding a
    value over ``LONG_MAX``, and its largest value; None if every value fits."""
    if not has_uint64(data.schema):
        return None
    for f in data.schema:
        for chunk in data.column(f.name).chunks:
            hit = _over_long(chunk, f.name)
            if hit is not None:
                return hit
    return None


def _over_long(array: pa.Array, path: str) -> tuple[str, int] | None:
    t = array.type
    if pa.types.is_uint64(t):
        top = pc.max(array).as_py()
        return (path, top) if top is not None and top > LONG_MAX else None
    if pa.types.is_dictionary(t):
        nested = contains(t.value_type, pa.types.is_uint64)
        return _over_long(array.dictionary, path) if nested else None
    if pa.types.is_map(t):
        return _over_long(array.keys, f"{path}.key") or _over_long(array.items,
                                                                    f"{path}.value")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        nested = contains(t.value_type, pa.types.is_uint64)
        return _over_long(array.flatten(), f"{path}[]") if nested else None
    if pa.types.is_struct(t):
        for i, child in enumerate(t):
            if contains(child.type, pa.types.is_uint64):
                hit = _over_long(array.field(i), f"{path}.{child.name}")
                if hit is not None:
                    return hit
    return None


def values_refusal(data: pa.Table, fmt: str | None, table: str) -> UnsupportedType | None:
    """The error that refuses ``data`` for a table of format ``fmt`` because of its values
    (a ``uint64`` over 2**63-1 in a lake table, see the module doc), or None."""
    if fmt not in LAKE_FORMATS:
        return None
    hit = over_long(data)
    if hit is None:
        return None
    column, value = hit
    return UnsupportedType(
        table, column, "uint64",
        f"it holds {value}, over {LONG_MAX}, the largest value of the long a {fmt} table "
        f"writes uint64 as ({'Iceberg' if fmt == 'iceberg' else 'Delta Lake'} has no "
        "unsigned integers)",
        "append such values as decimal128(20, 0) or as strings, in a column of that type, "
        "or keep them in a table of format parquet, which holds uint64 whole")


_LAKE_NAMES = {"iceberg": "Iceberg", "delta": "Delta Lake"}


def _lake_issue(t: pa.DataType, fmt: str, path: str) -> tuple[str, str, str, str] | None:
    """``(column path, its type, reason, fix)`` if a table of format ``fmt`` has no type for ``t``
    (see the module doc), nested types included; else None."""
    name = _LAKE_NAMES[fmt]
    if pa.types.is_duration(t):
        return path, str(t), f"{name} has no duration type", (
            "cast it to int64 (e.g. microseconds)")
    if pa.types.is_time(t) and fmt == "delta":
        return path, str(t), f"{name} has no time type", (
            "cast it to int64 (e.g. microseconds since midnight) or to a string")
    if pa.types.is_decimal(t) and t.precision > 38:
        return path, str(t), f"{name}'s decimals have at most 38 digits", (
            "cast it to decimal128(38, scale) if its values fit, or to a string")
    if pa.types.is_dictionary(t):
        return _lake_issue(t.value_type, fmt, path)
    if pa.types.is_map(t):
        return _lake_issue(t.key_type, fmt, f"{path}.key") or \
            _lake_issue(t.item_type, fmt, f"{path}.value")
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _lake_issue(t.value_type, fmt, f"{path}[]")
    if pa.types.is_struct(t):
        for f in t:
            issue = _lake_issue(f.type, fmt, f"{path}.{f.name}")
            if issue is not None:
                return issue
    return None


@functools.lru_cache(maxsize=512)
def format_refusal(schema: pa.Schema, fmt: str | None, table: str) -> UnsupportedType | None:
    """The error that refuses a batch of ``schema`` for a table of format ``fmt`` that has
    no type for one of its columns (see the module doc), or None."""
    if fmt not in LAKE_FORMATS:
        return None
    for f in schema:
        issue = _lake_issue(f.type, fmt, f.name)
        if issue is not None:
            column, type_, reason, fix = issue
            return UnsupportedType(table, column, type_, reason,
                                   f"{fix}, or keep it in a table of format parquet")
    return None


@functools.lru_cache(maxsize=512)
def lake_sensitive(schema: pa.Schema) -> bool:
    """Whether a lake format would refuse ``schema`` (so ``append`` needs the format)."""
    return any(format_refusal(schema, fmt, "") is not None for fmt in LAKE_FORMATS)


class AppendCheck:
    """Refuses, at ``append``, a batch whose types the table cannot write (see above).

    Nearly every schema needs no look-up: only one with a type Spark rejects needs the
    table's configuration (``needs_config``; ``check`` does the ``GET`` with ``client``,
    an asynchronous producer does it itself and calls ``decide``), and a table's last
    accepted schema is remembered so the check runs once per schema, not per batch.
    """

    def __init__(self, client: Any, default_format: str = "parquet") -> None:
        self._client = client
        #: the format of a table without one in its configuration (``table_format``)
        self.default_format = default_format
        self._accepted: dict[str, pa.Schema] = {}

    def check(self, keys: wire.Keys, schema: pa.Schema) -> None:
        config = self._client.get(keys.config) if self.needs_config(keys, schema) else None
        self.decide(keys, schema, config)

    def needs_config(self, keys: wire.Keys, schema: pa.Schema) -> bool:
        known = self._accepted.get(keys.table)
        if known is not None and known.equals(schema):
            return False
        return refusal(schema, False, keys.table) is None and (
            refusal(schema, True, keys.table) is not None or lake_sensitive(schema))

    def decide(self, keys: wire.Keys, schema: pa.Schema, config: bytes | str | None) -> None:
        """Raise the refusal of ``schema``, if any; ``config`` is the table's configuration
        (JSON), read only when ``needs_config`` said so (else None)."""
        known = self._accepted.get(keys.table)
        if known is not None and known.equals(schema):
            return
        error = refusal(schema, False, keys.table)
        if error is None and self.needs_config(keys, schema):
            parsed = TableConfig.from_json(config)
            error = refusal(schema, parsed.spark_compatible, keys.table) or format_refusal(
                schema, parsed.format or self.default_format, keys.table)
        if error is not None:
            raise error
        self._accepted[keys.table] = schema
